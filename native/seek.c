/*
 * lseek(2) with SEEK_DATA / SEEK_HOLE, which node's fs does not offer: how
 * rblock finds the holes of a sparse raw file (block status, map, convert,
 * the NBD server), as qemu's file driver does. Built by
 * scripts/build-native.mjs when a C compiler and node's headers are there;
 * without it a raw file reports all data, as before.
 *
 * seekData(fd, offset) / seekHole(fd, offset) return the resulting offset,
 * -1 for ENXIO (no data at or after offset / offset at or past the end), or
 * -(2 + errno) for any other error (e.g. EINVAL: the file system has no
 * SEEK_DATA). Only positional I/O is used on these descriptors elsewhere, so
 * moving the file position does no harm.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <node_api.h>
#include <unistd.h>

static napi_value seek_with(napi_env env, napi_callback_info info, int whence) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd = -1;
  int64_t offset = 0;
  napi_value out;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &offset) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd, offset)");
    return NULL;
  }
  off_t r = lseek(fd, (off_t)offset, whence);
  double v = r >= 0 ? (double)r : errno == ENXIO ? -1.0 : -2.0 - (double)errno;
  napi_create_double(env, v, &out);
  return out;
}

static napi_value seek_data(napi_env env, napi_callback_info info) { return seek_with(env, info, SEEK_DATA); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return seek_with(env, info, SEEK_HOLE); }

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_default, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, 2, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
