// Must NOT compile: a file built as part of common/engine that includes gRPC.
// ctest's layer_guard_engine_grpc checks the build refuses it.
#include <grpcpp/grpcpp.h>
