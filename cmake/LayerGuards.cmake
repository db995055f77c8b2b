# Layer guards: a layer of common/ may include only itself and the layers
# below it (engine < kv < store < pipeline < server), and only the layers
# that talk to gRPC or Redis may include their headers.
#
# ape_layer_guard(target NAME name FORBID dir...) makes, for `target`, a
# folder of stand-in headers: one for every header under each forbidden dir
# (relative to the source tree or to the system include folder), each an
# #error that names the rule. The folder comes first on the target's include
# path, so a wrong #include fails to compile at the include line, with the
# rule in the message. Correct code never opens these files.
set(APE_GUARD_ROOT ${CMAKE_BINARY_DIR}/layer_guards)
set(APE_SYSTEM_INCLUDE /usr/include)
# Generated at build time, so listed rather than globbed.
set(APE_GENERATED_API_HEADERS
    ape/v1/encoder.pb.h ape/v1/encoder.grpc.pb.h ape/v1/decoder.pb.h ape/v1/decoder.grpc.pb.h)

function(ape_layer_guard target)
  cmake_parse_arguments(G "" "NAME" "FORBID" ${ARGN})
  set(dir ${APE_GUARD_ROOT}/${G_NAME})
  set(headers)
  foreach(f ${G_FORBID})
    if(f STREQUAL "generated-api")
      list(APPEND headers ${APE_GENERATED_API_HEADERS})
      continue()
    endif()
    if(EXISTS ${CMAKE_SOURCE_DIR}/${f})
      set(root ${CMAKE_SOURCE_DIR})
    elseif(EXISTS ${APE_SYSTEM_INCLUDE}/${f})
      set(root ${APE_SYSTEM_INCLUDE})
    else()
      continue()  # a library that is not installed cannot be included either
    endif()
    file(GLOB_RECURSE found RELATIVE ${root} ${root}/${f}/*.h)
    list(APPEND headers ${found})
  endforeach()
  foreach(h ${headers})
    if(NOT EXISTS ${dir}/${h})
      file(WRITE ${dir}/${h}
           "#error \"layer rule: ${G_NAME} must not include ${h} (see cmake/LayerGuards.cmake)\"\n")
    endif()
  endforeach()
  target_include_directories(${target} BEFORE PRIVATE ${dir})
endfunction()

# What each layer must not see.
set(APE_FORBID_NETWORK grpcpp grpc grpc++ google/protobuf generated-api)
set(APE_FORBID_FOR_ENGINE common/kv common/store common/pipeline common/server
    encoder_service decoder_service hiredis ${APE_FORBID_NETWORK})
set(APE_FORBID_FOR_KV common/store common/pipeline common/server
    encoder_service decoder_service hiredis ${APE_FORBID_NETWORK})
set(APE_FORBID_FOR_STORE common/kv common/pipeline common/server
    encoder_service decoder_service ${APE_FORBID_NETWORK})
set(APE_FORBID_FOR_PIPELINE common/server encoder_service decoder_service hiredis ${APE_FORBID_NETWORK})
