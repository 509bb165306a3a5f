# Writes qlora_version_info.h with the git commit; rewrites only when it changed so that an
# unchanged tree does not rebuild anything.
execute_process(COMMAND git -C ${SOURCE_DIR} describe --always --dirty --abbrev=12
                OUTPUT_VARIABLE commit OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE rc)
if(NOT rc EQUAL 0 OR commit STREQUAL "")
  set(commit "unknown")
endif()
set(text "#pragma once\n#define QLORA_VERSION \"${VERSION}\"\n#define QLORA_GIT_COMMIT \"${commit}\"\n#define QLORA_TORCH_VERSION \"${TORCH_VERSION}\"\n")
if(EXISTS ${OUT})
  file(READ ${OUT} old)
endif()
if(NOT "${old}" STREQUAL "${text}")
  file(WRITE ${OUT} "${text}")
endif()
