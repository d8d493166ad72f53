/*
 * spillway_native: the few Linux file-system calls Node's fs module does not expose, as a
 * minimal N-API addon in plain C (NAPI_VERSION 8, no node-addon-api).
 *
 *   seekData(fd, offset) / seekHole(fd, offset) -> Promise<number>   (-1 when ENXIO)
 *   seekEnd(fd)                                  -> Promise<number>   (size of a block device)
 *   punchHole(fd, offset, len)                   -> Promise<void>     (PUNCH_HOLE|KEEP_SIZE)
 *   zeroRange(fd, offset, len)                   -> Promise<void>     (ZERO_RANGE)
 *   ficlone(dstFd, srcFd)                        -> Promise<void>     (FICLONE ioctl)
 *   ofdLock(fd, { type, start, len, wait })      -> undefined         (F_OFD_SETLK)
 *   ofdGetLock(fd, { type, start, len })         -> lock | null       (F_OFD_GETLK)
 *
 * Calls that can block (seek on some file systems, fallocate, ficlone) run on the libuv thread
 * pool through napi_async_work; the lock calls never block (F_OFD_SETLK, not SETLKW) and are
 * synchronous. Failures are JS Errors whose `code` is the errno name ("EAGAIN", "EOPNOTSUPP")
 * plus `errno` (negative, as Node's fs does) and `syscall`.
 *
 * Why not an npm package: fs-native-extensions (holepunch) has flock-style locks, trim and
 * sparse files but no SEEK_DATA/SEEK_HOLE, zero-range or OFD byte-range locks; fs-ext (NAN)
 * has flock and plain seek only; @ronomon/direct-io is about O_DIRECT alignment. None covers
 * this set, so it is written here, small enough to read in one sitting.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#ifndef NAPI_VERSION
#define NAPI_VERSION 8
#endif

#ifndef __linux__
#error "spillway_native is Linux-only (SEEK_DATA, fallocate modes, OFD locks, FICLONE)"
#endif

#include <errno.h>
#include <fcntl.h>
#include <linux/falloc.h>
#include <linux/fs.h>
#include <math.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <unistd.h>

#include <node_api.h>

#ifndef FICLONE
#define FICLONE _IOW(0x94, 9, int)
#endif

#define CHECK_NAPI(env, call)                                                   \
  do {                                                                          \
    if ((call) != napi_ok) {                                                    \
      napi_throw_error((env), "ERR_SPILLWAY_NATIVE", "N-API call failed: " #call); \
      return NULL;                                                              \
    }                                                                           \
  } while (0)

/* ---- errno names ---------------------------------------------------------------------- */

static const char *errno_name(int err) {
  switch (err) {
    case EPERM: return "EPERM";
    case ENOENT: return "ENOENT";
    case EINTR: return "EINTR";
    case EIO: return "EIO";
    case ENXIO: return "ENXIO";
    case EBADF: return "EBADF";
    case EAGAIN: return "EAGAIN";
    case ENOMEM: return "ENOMEM";
    case EACCES: return "EACCES";
    case EFAULT: return "EFAULT";
    case EBUSY: return "EBUSY";
    case EXDEV: return "EXDEV";
    case ENODEV: return "ENODEV";
    case EISDIR: return "EISDIR";
    case EINVAL: return "EINVAL";
    case ENOTTY: return "ENOTTY";
    case ETXTBSY: return "ETXTBSY";
    case EFBIG: return "EFBIG";
    case ENOSPC: return "ENOSPC";
    case ESPIPE: return "ESPIPE";
    case EROFS: return "EROFS";
    case EDEADLK: return "EDEADLK";
    case ENOLCK: return "ENOLCK";
    case ENOSYS: return "ENOSYS";
    case EOVERFLOW: return "EOVERFLOW";
    case EOPNOTSUPP: return "EOPNOTSUPP"; /* == ENOTSUP on Linux */
    case EDQUOT: return "EDQUOT";
    case ENOMEDIUM: return "ENOMEDIUM";
    default: return "EUNKNOWN";
  }
}

/* An Error with code/errno/syscall, like Node's fs errors. */
static napi_value make_errno_error(napi_env env, int err, const char *syscall) {
  char msg[256];
  snprintf(msg, sizeof msg, "%s: %s (%s)", syscall, strerror(err), errno_name(err));
  napi_value code, message, error, errno_v, syscall_v;
  if (napi_create_string_utf8(env, errno_name(err), NAPI_AUTO_LENGTH, &code) != napi_ok) return NULL;
  if (napi_create_string_utf8(env, msg, NAPI_AUTO_LENGTH, &message) != napi_ok) return NULL;
  if (napi_create_error(env, code, message, &error) != napi_ok) return NULL;
  if (napi_create_int32(env, -err, &errno_v) == napi_ok) napi_set_named_property(env, error, "errno", errno_v);
  if (napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &syscall_v) == napi_ok)
    napi_set_named_property(env, error, "syscall", syscall_v);
  return error;
}

static void throw_errno(napi_env env, int err, const char *syscall) {
  napi_value error = make_errno_error(env, err, syscall);
  if (error != NULL) napi_throw(env, error);
  else napi_throw_error(env, errno_name(err), syscall);
}

/* ---- argument parsing ------------------------------------------------------------------ */

static int get_fd(napi_env env, napi_value v, const char *what, int *out) {
  napi_valuetype t;
  double d;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number || napi_get_value_double(env, v, &d) != napi_ok ||
      d != floor(d) || d < 0 || d > 2147483647.0) {
    char msg[96];
    snprintf(msg, sizeof msg, "%s must be a non-negative integer file descriptor", what);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
    return 0;
  }
  *out = (int)d;
  return 1;
}

/* A non-negative safe integer (offsets and lengths). */
static int get_u53(napi_env env, napi_value v, const char *what, int64_t *out) {
  napi_valuetype t;
  double d;
  if (napi_typeof(env, v, &t) != napi_ok || t != napi_number || napi_get_value_double(env, v, &d) != napi_ok ||
      d != floor(d) || d < 0 || d > 9007199254740991.0) {
    char msg[96];
    snprintf(msg, sizeof msg, "%s must be a non-negative safe integer", what);
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", msg);
    return 0;
  }
  *out = (int64_t)d;
  return 1;
}

static int get_args(napi_env env, napi_callback_info info, size_t want, napi_value *argv) {
  size_t argc = want;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return 0;
  if (argc < want) {
    char msg[64];
    snprintf(msg, sizeof msg, "expected %zu arguments, got %zu", want, argc);
    napi_throw_type_error(env, "ERR_MISSING_ARGS", msg);
    return 0;
  }
  return 1;
}

/* ---- async work: seek, fallocate, ficlone ------------------------------------------------ */

typedef enum { OP_SEEK_DATA, OP_SEEK_HOLE, OP_SEEK_END, OP_PUNCH_HOLE, OP_ZERO_RANGE, OP_FICLONE } op_kind;

typedef struct {
  napi_async_work work;
  napi_deferred deferred;
  op_kind op;
  int fd;
  int fd2;
  int64_t a;
  int64_t b;
  int64_t result;
  int err;
  const char *syscall;
} job;

static void job_execute(napi_env env, void *data) {
  (void)env;
  job *j = data;
  int r;
  off_t o;
  switch (j->op) {
    case OP_SEEK_DATA:
    case OP_SEEK_HOLE:
      o = lseek(j->fd, (off_t)j->a, j->op == OP_SEEK_DATA ? SEEK_DATA : SEEK_HOLE);
      if (o >= 0) j->result = (int64_t)o;
      else if (errno == ENXIO) j->result = -1; /* offset at or beyond EOF, or no data after it */
      else j->err = errno;
      break;
    case OP_SEEK_END:
      o = lseek(j->fd, 0, SEEK_END);
      if (o >= 0) j->result = (int64_t)o;
      else j->err = errno;
      break;
    case OP_PUNCH_HOLE:
    case OP_ZERO_RANGE: {
      int mode = j->op == OP_PUNCH_HOLE ? (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) : FALLOC_FL_ZERO_RANGE;
      do r = fallocate(j->fd, mode, (off_t)j->a, (off_t)j->b);
      while (r < 0 && errno == EINTR);
      if (r < 0) j->err = errno;
      break;
    }
    case OP_FICLONE:
      do r = ioctl(j->fd, FICLONE, j->fd2);
      while (r < 0 && errno == EINTR);
      if (r < 0) j->err = errno;
      break;
  }
}

static void job_complete(napi_env env, napi_status status, void *data) {
  job *j = data;
  napi_value value = NULL;
  if (status != napi_ok) {
    napi_value code, msg;
    napi_create_string_utf8(env, "ERR_SPILLWAY_NATIVE", NAPI_AUTO_LENGTH, &code);
    napi_create_string_utf8(env, "native work was cancelled", NAPI_AUTO_LENGTH, &msg);
    napi_create_error(env, code, msg, &value);
    napi_reject_deferred(env, j->deferred, value);
  } else if (j->err != 0) {
    value = make_errno_error(env, j->err, j->syscall);
    napi_reject_deferred(env, j->deferred, value);
  } else {
    if (j->op == OP_SEEK_DATA || j->op == OP_SEEK_HOLE || j->op == OP_SEEK_END)
      napi_create_int64(env, j->result, &value);
    else
      napi_get_undefined(env, &value);
    napi_resolve_deferred(env, j->deferred, value);
  }
  napi_delete_async_work(env, j->work);
  free(j);
}

static napi_value queue_job(napi_env env, op_kind op, int fd, int fd2, int64_t a, int64_t b, const char *syscall) {
  job *j = calloc(1, sizeof *j);
  if (j == NULL) {
    throw_errno(env, ENOMEM, syscall);
    return NULL;
  }
  j->op = op;
  j->fd = fd;
  j->fd2 = fd2;
  j->a = a;
  j->b = b;
  j->syscall = syscall;
  napi_value promise, name;
  if (napi_create_promise(env, &j->deferred, &promise) != napi_ok ||
      napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &name) != napi_ok ||
      napi_create_async_work(env, NULL, name, job_execute, job_complete, j, &j->work) != napi_ok) {
    free(j);
    napi_throw_error(env, "ERR_SPILLWAY_NATIVE", "could not create async work");
    return NULL;
  }
  if (napi_queue_async_work(env, j->work) != napi_ok) {
    napi_delete_async_work(env, j->work);
    free(j);
    napi_throw_error(env, "ERR_SPILLWAY_NATIVE", "could not queue async work");
    return NULL;
  }
  return promise;
}

static napi_value seek_common(napi_env env, napi_callback_info info, op_kind op) {
  napi_value argv[2];
  int fd;
  int64_t off;
  if (!get_args(env, info, 2, argv) || !get_fd(env, argv[0], "fd", &fd) || !get_u53(env, argv[1], "offset", &off))
    return NULL;
  return queue_job(env, op, fd, -1, off, 0, op == OP_SEEK_DATA ? "lseek(SEEK_DATA)" : "lseek(SEEK_HOLE)");
}

static napi_value seek_data(napi_env env, napi_callback_info info) { return seek_common(env, info, OP_SEEK_DATA); }
static napi_value seek_hole(napi_env env, napi_callback_info info) { return seek_common(env, info, OP_SEEK_HOLE); }

static napi_value seek_end(napi_env env, napi_callback_info info) {
  napi_value argv[1];
  int fd;
  if (!get_args(env, info, 1, argv) || !get_fd(env, argv[0], "fd", &fd)) return NULL;
  return queue_job(env, OP_SEEK_END, fd, -1, 0, 0, "lseek(SEEK_END)");
}

static napi_value falloc_common(napi_env env, napi_callback_info info, op_kind op) {
  napi_value argv[3];
  int fd;
  int64_t off, len;
  if (!get_args(env, info, 3, argv) || !get_fd(env, argv[0], "fd", &fd) || !get_u53(env, argv[1], "offset", &off) ||
      !get_u53(env, argv[2], "len", &len))
    return NULL;
  if (len == 0) {
    napi_throw_range_error(env, "ERR_OUT_OF_RANGE", "len must be greater than zero (fallocate refuses 0)");
    return NULL;
  }
  return queue_job(env, op, fd, -1, off, len,
                   op == OP_PUNCH_HOLE ? "fallocate(PUNCH_HOLE)" : "fallocate(ZERO_RANGE)");
}

static napi_value punch_hole(napi_env env, napi_callback_info info) { return falloc_common(env, info, OP_PUNCH_HOLE); }
static napi_value zero_range(napi_env env, napi_callback_info info) { return falloc_common(env, info, OP_ZERO_RANGE); }

static napi_value ficlone(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int dst, src;
  if (!get_args(env, info, 2, argv) || !get_fd(env, argv[0], "dstFd", &dst) || !get_fd(env, argv[1], "srcFd", &src))
    return NULL;
  return queue_job(env, OP_FICLONE, dst, src, 0, 0, "ioctl(FICLONE)");
}

/* ---- OFD locks (synchronous, never waiting) ------------------------------------------------ */

/* Reads { type, start, len } from a JS object into a struct flock. */
static int get_flock(napi_env env, napi_value obj, int allow_unlock, struct flock *fl) {
  napi_valuetype t;
  if (napi_typeof(env, obj, &t) != napi_ok || t != napi_object) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "lock must be an object { type, start, len }");
    return 0;
  }
  napi_value type_v, start_v, len_v;
  char type[8] = {0};
  size_t n = 0;
  if (napi_get_named_property(env, obj, "type", &type_v) != napi_ok ||
      napi_typeof(env, type_v, &t) != napi_ok || t != napi_string ||
      napi_get_value_string_utf8(env, type_v, type, sizeof type, &n) != napi_ok) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_TYPE", "lock.type must be 'read', 'write' or 'unlock'");
    return 0;
  }
  memset(fl, 0, sizeof *fl); /* l_pid must be 0 for OFD commands */
  if (strcmp(type, "read") == 0) fl->l_type = F_RDLCK;
  else if (strcmp(type, "write") == 0) fl->l_type = F_WRLCK;
  else if (allow_unlock && strcmp(type, "unlock") == 0) fl->l_type = F_UNLCK;
  else {
    napi_throw_type_error(env, "ERR_INVALID_ARG_VALUE",
                          allow_unlock ? "lock.type must be 'read', 'write' or 'unlock'" : "lock.type must be 'read' or 'write'");
    return 0;
  }
  int64_t start = 0, len = 0;
  if (napi_get_named_property(env, obj, "start", &start_v) != napi_ok || !get_u53(env, start_v, "lock.start", &start))
    return 0;
  if (napi_get_named_property(env, obj, "len", &len_v) != napi_ok || !get_u53(env, len_v, "lock.len", &len)) return 0;
  fl->l_whence = SEEK_SET;
  fl->l_start = (off_t)start;
  fl->l_len = (off_t)len; /* 0 = to EOF and beyond */
  return 1;
}

static napi_value ofd_lock(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd;
  struct flock fl;
  if (!get_args(env, info, 2, argv) || !get_fd(env, argv[0], "fd", &fd) || !get_flock(env, argv[1], 1, &fl))
    return NULL;
  napi_value wait_v;
  bool wait = false;
  napi_valuetype t;
  if (napi_get_named_property(env, argv[1], "wait", &wait_v) == napi_ok && napi_typeof(env, wait_v, &t) == napi_ok &&
      t == napi_boolean)
    napi_get_value_bool(env, wait_v, &wait);
  if (wait) {
    napi_throw_type_error(env, "ERR_INVALID_ARG_VALUE",
                          "lock.wait: true is not supported (F_OFD_SETLKW would block the event loop)");
    return NULL;
  }
  int r;
  do r = fcntl(fd, F_OFD_SETLK, &fl);
  while (r < 0 && errno == EINTR);
  if (r < 0) {
    throw_errno(env, errno, "fcntl(F_OFD_SETLK)");
    return NULL;
  }
  napi_value undef;
  CHECK_NAPI(env, napi_get_undefined(env, &undef));
  return undef;
}

static napi_value ofd_get_lock(napi_env env, napi_callback_info info) {
  napi_value argv[2];
  int fd;
  struct flock fl;
  if (!get_args(env, info, 2, argv) || !get_fd(env, argv[0], "fd", &fd) || !get_flock(env, argv[1], 0, &fl))
    return NULL;
  if (fcntl(fd, F_OFD_GETLK, &fl) < 0) {
    throw_errno(env, errno, "fcntl(F_OFD_GETLK)");
    return NULL;
  }
  napi_value result;
  if (fl.l_type == F_UNLCK) {
    CHECK_NAPI(env, napi_get_null(env, &result));
    return result;
  }
  napi_value type_v, start_v, len_v, pid_v;
  CHECK_NAPI(env, napi_create_object(env, &result));
  CHECK_NAPI(env, napi_create_string_utf8(env, fl.l_type == F_WRLCK ? "write" : "read", NAPI_AUTO_LENGTH, &type_v));
  CHECK_NAPI(env, napi_create_int64(env, (int64_t)fl.l_start, &start_v));
  CHECK_NAPI(env, napi_create_int64(env, (int64_t)fl.l_len, &len_v));
  /* -1 when the conflicting lock is an OFD lock (no owning process); a pid for a POSIX lock */
  CHECK_NAPI(env, napi_create_int32(env, (int32_t)fl.l_pid, &pid_v));
  CHECK_NAPI(env, napi_set_named_property(env, result, "type", type_v));
  CHECK_NAPI(env, napi_set_named_property(env, result, "start", start_v));
  CHECK_NAPI(env, napi_set_named_property(env, result, "len", len_v));
  CHECK_NAPI(env, napi_set_named_property(env, result, "pid", pid_v));
  return result;
}

/* ---- module ---------------------------------------------------------------------------- */

NAPI_MODULE_INIT() {
  napi_property_descriptor props[] = {
      {"seekData", NULL, seek_data, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekHole", NULL, seek_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"seekEnd", NULL, seek_end, NULL, NULL, NULL, napi_enumerable, NULL},
      {"punchHole", NULL, punch_hole, NULL, NULL, NULL, napi_enumerable, NULL},
      {"zeroRange", NULL, zero_range, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ficlone", NULL, ficlone, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdLock", NULL, ofd_lock, NULL, NULL, NULL, napi_enumerable, NULL},
      {"ofdGetLock", NULL, ofd_get_lock, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) return NULL;
  return exports;
}
