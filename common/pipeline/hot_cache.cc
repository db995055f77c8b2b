#include "common/pipeline/hot_cache.h"
