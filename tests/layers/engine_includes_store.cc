// Must NOT compile: a file built as part of common/engine that includes a
// header of a higher layer. ctest's layer_guard_engine_store checks it.
#include "common/store/redis_store.h"
