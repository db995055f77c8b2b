// Must NOT compile: a file built as part of common/engine that includes
// hiredis. ctest's layer_guard_engine_hiredis checks the build refuses it.
#include <hiredis/hiredis.h>
