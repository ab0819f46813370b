/*
 * The few host I/O calls node's fs does not offer, built by
 * scripts/build-native.mjs when a C compiler and node's headers are there
 * (nothing is downloaded); src/block/hostio.ts loads it and every caller has a
 * fallback without it.
 *
 * seekData(fd, offset) / seekHole(fd, offset): lseek(2) with SEEK_DATA /
 * SEEK_HOLE, how rblock finds the holes of a sparse raw file (block status,
 * map, convert, the NBD server), as qemu's file driver does. They return the
 * resulting offset, -1 for ENXIO (no data at or after offset / offset at or
 * past the end), or -(2 + errno) for any other error (e.g. EINVAL: the file
 * system has no SEEK_DATA). Only positional I/O is used on these
 * descriptors elsewhere, so moving the file position does no harm.
 *
 * preadNowait(fd, buf, offset): preadv2(2) with RWF_NOWAIT, a read that is
 * served only from the page cache and never blocks: what the NBD server tries
 * first, on its own thread, before handing a read to node's thread pool (the
 * round trip through the pool cost more than a cached 4 KiB read itself).
 * Returns the bytes read (possibly fewer than asked: only the cached
 * prefix, 0 at the end of the file), -1 when nothing could be read without
 * blocking (EAGAIN), or -(2 + errno) for any other error (EOPNOTSUPP: the
 * kernel or file system has no RWF_NOWAIT).
 *
 * dupFd(fd): a close-on-exec duplicate of a descriptor (F_DUPFD_CLOEXEC), or
 * -(2 + errno). The NBD server re-opens each accepted socket through a
 * duplicate as a net.Socket with `onread`, node's documented way to read a
 * socket into one reused buffer (it exists for sockets made from an fd or by
 * connect(), not for accepted ones): a fresh 64 KiB buffer per socket read
 * was half the CPU of receiving write payloads, and drove the major GCs.
 *
 * setSendBuffer(fd, bytes): SO_SNDBUF, which node sets only on UDP sockets;
 * returns the size the kernel then reports (it doubles the request for its
 * bookkeeping and caps it at net.core.wmem_max), or -(2 + errno).
 *
 * sendNow(fd, buffers): sendmsg(2) of an array of Uint8Arrays on a socket,
 * never blocking (MSG_DONTWAIT) and never raising SIGPIPE (MSG_NOSIGNAL),
 * as many calls as IOV_MAX needs: the bytes the kernel took (fewer than all
 * when the socket's send buffer filled), -1 when it took none (EAGAIN), or
 * -(2 + errno). How the NBD server hands a turn's replies to the kernel
 * without node's stream machinery (src/nbd/stream.ts, StreamWriter).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <node_api.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <unistd.h>

static napi_value number(napi_env env, double v) {
  napi_value out;
  napi_create_double(env, v, &out);
  return out;
}

static napi_value seek_with(napi_env env, napi_callback_info info, int whence) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd = -1;
  int64_t offset = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok || napi_get_value_int64(env, argv[1], &offset) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd, offset)");
    return NULL;
  }
  off_t r = lseek(fd, (off_t)offset, whence);
  return number(env, r >= 0 ? (double)r : errno == ENXIO ? -1.0 : -2.0 - (double)errno);
}

static napi_value seek_data(napi_env env, napi_callback_info info) { return seek_with(env, info, SEEK_DATA); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return seek_with(env, info, SEEK_HOLE); }

static napi_value pread_nowait(napi_env env, napi_callback_info info) {
  size_t argc = 3;
  napi_value argv[3];
  int32_t fd = -1;
  int64_t offset = 0;
  napi_typedarray_type type;
  size_t length = 0;
  void *data = NULL;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 3 ||
      napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_typedarray_info(env, argv[1], &type, &length, &data, NULL, NULL) != napi_ok || type != napi_uint8_array ||
      napi_get_value_int64(env, argv[2], &offset) != napi_ok || offset < 0) {
    napi_throw_type_error(env, NULL, "expected (fd, Uint8Array, offset)");
    return NULL;
  }
  if (length == 0) return number(env, 0);
#ifdef RWF_NOWAIT
  struct iovec iov = {data, length};
  ssize_t r = preadv2(fd, &iov, 1, (off_t)offset, RWF_NOWAIT);
  return number(env, r >= 0 ? (double)r : errno == EAGAIN ? -1.0 : -2.0 - (double)errno);
#else
  return number(env, -2.0 - (double)EOPNOTSUPP);
#endif
}

static napi_value dup_fd(napi_env env, napi_callback_info info) {
  size_t argc = 1;
  napi_value argv[1];
  int32_t fd = -1;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 1 || napi_get_value_int32(env, argv[0], &fd) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd)");
    return NULL;
  }
  int r = fcntl(fd, F_DUPFD_CLOEXEC, 0);
  return number(env, r >= 0 ? (double)r : -2.0 - (double)errno);
}

static napi_value set_send_buffer(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd = -1, bytes = 0;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_get_value_int32(env, argv[1], &bytes) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd, bytes)");
    return NULL;
  }
  if (setsockopt(fd, SOL_SOCKET, SO_SNDBUF, &bytes, sizeof bytes) != 0) return number(env, -2.0 - (double)errno);
  int got = 0;
  socklen_t len = sizeof got;
  if (getsockopt(fd, SOL_SOCKET, SO_SNDBUF, &got, &len) != 0) return number(env, -2.0 - (double)errno);
  return number(env, (double)got);
}

#ifndef IOV_MAX
#define IOV_MAX 1024
#endif

static napi_value send_now(napi_env env, napi_callback_info info) {
  size_t argc = 2;
  napi_value argv[2];
  int32_t fd = -1;
  uint32_t count = 0;
  bool is_array = false;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok || argc < 2 || napi_get_value_int32(env, argv[0], &fd) != napi_ok ||
      napi_is_array(env, argv[1], &is_array) != napi_ok || !is_array || napi_get_array_length(env, argv[1], &count) != napi_ok) {
    napi_throw_type_error(env, NULL, "expected (fd, Uint8Array[])");
    return NULL;
  }
  struct iovec iov[64];
  double total = 0;
  uint32_t i = 0;
  while (i < count) {
    /* Up to 64 buffers per call: a turn's replies are rarely more, and a short call is retried below. */
    int n = 0;
    size_t want = 0;
    for (; i < count && n < 64 && n < IOV_MAX; i++) {
      napi_value el;
      napi_typedarray_type type;
      size_t length = 0;
      void *data = NULL;
      if (napi_get_element(env, argv[1], i, &el) != napi_ok ||
          napi_get_typedarray_info(env, el, &type, &length, &data, NULL, NULL) != napi_ok || type != napi_uint8_array) {
        napi_throw_type_error(env, NULL, "expected (fd, Uint8Array[])");
        return NULL;
      }
      if (length == 0) continue;
      iov[n].iov_base = data;
      iov[n].iov_len = length;
      want += length;
      n++;
    }
    if (n == 0) continue;
    struct msghdr msg = {0};
    msg.msg_iov = iov;
    msg.msg_iovlen = n;
    ssize_t r;
    do r = sendmsg(fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
    while (r < 0 && errno == EINTR);
    if (r < 0) {
      if (total > 0) return number(env, total);
      return number(env, errno == EAGAIN || errno == EWOULDBLOCK ? -1.0 : -2.0 - (double)errno);
    }
    total += (double)r;
    if ((size_t)r < want) break; /* the send buffer is full */
  }
  return number(env, total);
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_default, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_default, NULL},
      {"preadNowait", NULL, pread_nowait, NULL, NULL, NULL, napi_default, NULL},
      {"dupFd", NULL, dup_fd, NULL, NULL, NULL, napi_default, NULL},
      {"setSendBuffer", NULL, set_send_buffer, NULL, NULL, NULL, napi_default, NULL},
      {"sendNow", NULL, send_now, NULL, NULL, NULL, napi_default, NULL},
  };
  napi_define_properties(env, exports, 6, props);
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
