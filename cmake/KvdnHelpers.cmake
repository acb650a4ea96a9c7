# Helpers shared by every kvdn target.

# Warnings for kvdn's own code (third-party headers are included as SYSTEM by their targets).
function(kvdn_set_warnings target)
  target_compile_options(${target} PRIVATE
    $<$<COMPILE_LANGUAGE:CXX>:-Wall -Wextra -Wpedantic -Wshadow -Wnon-virtual-dtor
      -Wno-missing-field-initializers>)
  if(KVDN_WERROR)
    target_compile_options(${target} PRIVATE $<$<COMPILE_LANGUAGE:CXX>:-Werror>)
  endif()
endfunction()

# kvdn_add_library(NAME <module> SOURCES ... DEPS_PUBLIC ... DEPS_PRIVATE ...)
# Creates kvdn_<module> with alias kvdn::<module>; public headers in <module>/include.
function(kvdn_add_library)
  cmake_parse_arguments(A "" "NAME" "SOURCES;DEPS_PUBLIC;DEPS_PRIVATE" ${ARGN})
  add_library(kvdn_${A_NAME} ${A_SOURCES})
  add_library(kvdn::${A_NAME} ALIAS kvdn_${A_NAME})
  target_include_directories(kvdn_${A_NAME} PUBLIC
    $<BUILD_INTERFACE:${CMAKE_CURRENT_SOURCE_DIR}/include> $<INSTALL_INTERFACE:include>)
  target_link_libraries(kvdn_${A_NAME} PUBLIC ${A_DEPS_PUBLIC} PRIVATE ${A_DEPS_PRIVATE})
  kvdn_set_warnings(kvdn_${A_NAME})
endfunction()

# kvdn_add_test(NAME <name> LABEL <unit|integration|transfer|cluster|gpu> SOURCES ... DEPS ...)
# The one place a test is registered, so no test is built and never run (STYLE.md 4).
function(kvdn_add_test)
  cmake_parse_arguments(A "" "NAME;LABEL;TIMEOUT" "SOURCES;DEPS" ${ARGN})
  if(NOT A_LABEL)
    message(FATAL_ERROR "kvdn_add_test(${A_NAME}) needs a LABEL")
  endif()
  add_executable(${A_NAME} ${A_SOURCES})
  target_link_libraries(${A_NAME} PRIVATE ${A_DEPS} kvdn_testing GTest::gmock GTest::gtest_main)
  kvdn_set_warnings(${A_NAME})
  add_test(NAME ${A_NAME} COMMAND ${A_NAME})
  if(NOT A_TIMEOUT)
    set(A_TIMEOUT 300)
  endif()
  set_tests_properties(${A_NAME} PROPERTIES LABELS ${A_LABEL} TIMEOUT ${A_TIMEOUT})
endfunction()
