#include "common/pipeline/batch_decoder.h"
