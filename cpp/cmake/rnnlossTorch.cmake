# find_package(Torch) for rnnloss's build and for projects that find_package(rnnloss).
#
# torch's pip wheels link kineto (the profiler library) into libtorch_cpu and ship no separate
# libkineto, yet TorchConfig.cmake looks for one and warns "library kineto not found". The
# warning is harmless. Where the wheel's lib folder has libtorch_cpu but no libkineto, point
# TorchConfig's lookup at libtorch_cpu, which holds kineto (and which `torch` links already), so
# the warning is not printed. A libtorch that ships libkineto is left alone. TorchConfig.cmake is
# looked for where find_package(Torch) will look first: Torch_DIR, CMAKE_PREFIX_PATH, and (for
# projects that find_package(rnnloss)) the libtorch rnnloss was built against, _rnnloss_torch_hint.
if(NOT DEFINED kineto_LIBRARY)
  find_file(_rnnloss_torch_config TorchConfig.cmake
            PATHS ${Torch_DIR} ${CMAKE_PREFIX_PATH} ${_rnnloss_torch_hint} PATH_SUFFIXES Torch share/cmake/Torch
            NO_DEFAULT_PATH)
  if(_rnnloss_torch_config)
    get_filename_component(_rnnloss_torch_lib "${_rnnloss_torch_config}/../../../../lib" ABSOLUTE)
    file(GLOB _rnnloss_kineto "${_rnnloss_torch_lib}/*kineto*")
    find_library(_rnnloss_torch_cpu torch_cpu PATHS "${_rnnloss_torch_lib}" NO_DEFAULT_PATH)
    if(NOT _rnnloss_kineto AND _rnnloss_torch_cpu)
      set(kineto_LIBRARY "${_rnnloss_torch_cpu}" CACHE FILEPATH "kineto: linked into libtorch_cpu in torch's wheels")
    endif()
  endif()
  unset(_rnnloss_torch_config CACHE)
  unset(_rnnloss_torch_cpu CACHE)
endif()
