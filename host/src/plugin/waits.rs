//! Host waits that end at the call's deadline.
//!
//! Epoch interruption only fires while wasm runs; a plugin blocked in a host
//! call (a TCP read from a peer that never answers, `poll` on a socket, a
//! flush to a peer that never reads) would otherwise hold its route, and the
//! host's shutdown, forever. The sync WASI bindings run those waits with
//! `in_tokio`, which has no deadline; here the linker's entries for exactly
//! the functions that wait are replaced by wrappers that run the same async
//! implementation under `tokio::time::timeout_at(call.deadline)` and trap as
//! `Trap::Interrupt` when it passes, which `classify_trap` reports as a
//! timeout. Nothing else is touched: a call that never reaches these
//! functions pays nothing.
//!
//! Waits that are syscalls rather than futures cannot be cut by a timer. The
//! only unbounded ones a plugin can reach are opens of special files (a FIFO
//! `open()` waits for its peer) in granted directories, so `open-at` (and
//! `set-times-at`, which opens its target) never open a special file: they
//! open with `O_NONBLOCK`, check the type on the descriptor itself, and
//! refuse anything but regular files and directories.

use std::future::Future;
use std::os::fd::AsRawFd as _;

use cap_primitives::fs::{FollowSymlinks, OpenOptions, OpenOptionsExt as _};
use rustix::fs::{AtFlags, OFlags, Timespec, Timestamps};
use wasmtime::component::{Linker, Resource, ResourceTable, ResourceType};
use wasmtime::{StoreContextMut, Trap};
use wasmtime_wasi::OpenMode;
use wasmtime_wasi::filesystem::{
    Descriptor, Dir, File, WasiFilesystemCtxView, WasiFilesystemView as _,
};
use wasmtime_wasi::p2::bindings::filesystem::types;
use wasmtime_wasi::p2::bindings::io::{poll as io_poll, streams as io_streams};
use wasmtime_wasi::p2::{DynInputStream, DynOutputStream, DynPollable, StreamResult};
use wasmtime_wasi::runtime::in_tokio;

use super::State;

// The exact instance names `wasmtime_wasi::p2::add_to_linker_sync` defines
// (WIT packages in wasmtime-wasi-48.0.8/src/p2/wit/deps/*.wit are @0.2.12).
// `add_to_linker` checks they exist, so a wasmtime-wasi upgrade that moves
// the version fails loudly instead of silently shadowing nothing.
const IO_POLL: &str = "wasi:io/poll@0.2.12";
const IO_STREAMS: &str = "wasi:io/streams@0.2.12";
const FS_TYPES: &str = "wasi:filesystem/types@0.2.12";

/// Must match `allow_blocking_current_thread(true)` in `sandbox::wasi_ctx`:
/// descriptors opened here are used by wasmtime-wasi the same way as its own.
const BLOCK_CURRENT_THREAD: bool = true;

/// The WIT `stream-error` (lowered to the guest).
type WitStreamError = io_streams::StreamError;

/// Runs `fut` to completion on the ambient Tokio runtime, as the sync WASI
/// bindings do, but traps as an interrupt if `deadline` passes first.
///
/// The timeout is built inside `in_tokio`, where a runtime context exists
/// even on a thread without one (tests), and registers a timer only if `fut`
/// is not ready at once.
fn wait<F: Future>(deadline: Option<tokio::time::Instant>, fut: F) -> wasmtime::Result<F::Output> {
    match deadline {
        Some(at) => in_tokio(async move { tokio::time::timeout_at(at, fut).await })
            .map_err(|_elapsed| wasmtime::Error::from(Trap::Interrupt)),
        // No representable deadline (see `wait_deadline`): as before.
        None => Ok(in_tokio(fut)),
    }
}

/// What the generated bindings do with a `StreamResult`: a stream error
/// becomes the WIT variant, a `StreamError::Trap` a trap.
fn lower_stream<T>(
    table: &mut ResourceTable,
    r: StreamResult<T>,
) -> wasmtime::Result<Result<T, WitStreamError>> {
    match r {
        Ok(v) => Ok(Ok(v)),
        Err(e) => Ok(Err(
            <ResourceTable as io_streams::Host>::convert_stream_error(table, http_body_error(e))?,
        )),
    }
}

/// An HTTP response body's failure as the `error-code` a guest's
/// `http-error-code` finds: wasmtime-wasi-http leaves the body's error in
/// the embedder's form, which that function does not recognise.
fn http_body_error(e: wasmtime_wasi::p2::StreamError) -> wasmtime_wasi::p2::StreamError {
    use wasmtime_wasi::p2::StreamError;
    use wasmtime_wasi_http::p2::bindings::http::types::ErrorCode;
    let StreamError::LastOperationFailed(err) = e else {
        return e;
    };
    let code = match err.downcast_ref::<wasmtime_wasi_http::Error>() {
        Some(wasmtime_wasi_http::Error::HttpResponseBodySize(n)) => {
            ErrorCode::HttpResponseBodySize(*n)
        }
        Some(wasmtime_wasi_http::Error::Hyper(h)) => {
            if let Some(code) =
                std::error::Error::source(h).and_then(|cause| cause.downcast_ref::<ErrorCode>())
            {
                code.clone()
            } else if h.is_timeout() {
                ErrorCode::ConnectionReadTimeout
            } else if h.is_incomplete_message() {
                ErrorCode::HttpResponseIncomplete
            } else {
                ErrorCode::HttpProtocolError
            }
        }
        _ => return StreamError::LastOperationFailed(err),
    };
    StreamError::LastOperationFailed(code.into())
}

/// Fails unless `add_to_linker_sync` defined `func` in `interface`.
fn expect_defined(linker: &mut Linker<State>, interface: &str, func: &str) -> wasmtime::Result<()> {
    linker.allow_shadowing(false);
    // Defining it again without shadowing fails exactly when it exists.
    let fresh = linker
        .instance(interface)?
        .func_wrap(func, |_: StoreContextMut<'_, State>, (): ()| Ok(()))
        .is_ok();
    if fresh {
        wasmtime::bail!(
            "wasmtime-wasi no longer defines `{func}` in `{interface}`: update the names in plugin/waits.rs"
        );
    }
    Ok(())
}

/// Replaces WASI's waiting functions with deadline-bounded ones. Call after
/// `wasmtime_wasi::p2::add_to_linker_sync`.
pub(super) fn add_to_linker(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    expect_defined(linker, IO_POLL, "poll")?;
    expect_defined(linker, IO_STREAMS, "[method]input-stream.blocking-read")?;
    expect_defined(linker, FS_TYPES, "[method]descriptor.open-at")?;

    linker.allow_shadowing(true);
    add_poll(linker)?;
    add_stream_waits(linker)?;
    add_stream_drops(linker)?;
    add_filesystem(linker)?;
    linker.allow_shadowing(false);
    Ok(())
}

/// `wasi:io/poll`: `poll` and `pollable.block`.
fn add_poll(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    let mut i = linker.instance(IO_POLL)?;
    i.func_wrap(
        "poll",
        |mut store: StoreContextMut<'_, State>, (list,): (Vec<Resource<DynPollable>>,)| {
            let s = store.data_mut();
            let ready = wait(
                s.call.deadline,
                <ResourceTable as io_poll::Host>::poll(&mut s.table, list),
            )??;
            Ok((ready,))
        },
    )?;
    i.func_wrap(
        "[method]pollable.block",
        |mut store: StoreContextMut<'_, State>, (p,): (Resource<DynPollable>,)| {
            let s = store.data_mut();
            wait(
                s.call.deadline,
                <ResourceTable as io_poll::HostPollable>::block(&mut s.table, p),
            )??;
            Ok(())
        },
    )?;
    Ok(())
}

/// Registers a blocking `wasi:io/streams` method whose wait ends at the
/// call's deadline: `$method` of `$host` on the store's table, its stream
/// result lowered as WASI's own binding would.
macro_rules! stream_wait {
    ($i:ident, $name:literal, $host:path, $method:ident, ($($arg:ident: $ty:ty),+)) => {
        $i.func_wrap(
            $name,
            |mut store: StoreContextMut<'_, State>, ($($arg,)+): ($($ty,)+)| {
                let s = store.data_mut();
                let r = wait(
                    s.call.deadline,
                    <ResourceTable as $host>::$method(&mut s.table, $($arg),+),
                )?;
                Ok((lower_stream(&mut s.table, r)?,))
            },
        )?;
    };
}

/// Registers a non-blocking `wasi:io/streams` method again, only so that
/// its error is lowered as the blocking ones' are ([`lower_stream`]).
macro_rules! stream_now {
    ($i:ident, $name:literal, $host:path, $method:ident, ($($arg:ident: $ty:ty),+)) => {
        $i.func_wrap(
            $name,
            |mut store: StoreContextMut<'_, State>, ($($arg,)+): ($($ty,)+)| {
                let s = store.data_mut();
                let r = <ResourceTable as $host>::$method(&mut s.table, $($arg),+);
                Ok((lower_stream(&mut s.table, r)?,))
            },
        )?;
    };
}

/// `wasi:io/streams`: the blocking reads, skips, writes, flushes and
/// splices; and the non-blocking reads and skips, for their errors.
fn add_stream_waits(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    use io_streams::{HostInputStream as In, HostOutputStream as Out};
    type Input = Resource<DynInputStream>;
    type Output = Resource<DynOutputStream>;
    let mut i = linker.instance(IO_STREAMS)?;
    stream_now!(i, "[method]input-stream.read", In, read, (stream: Input, len: u64));
    stream_now!(i, "[method]input-stream.skip", In, skip, (stream: Input, len: u64));
    stream_wait!(i, "[method]input-stream.blocking-read", In, blocking_read, (stream: Input, len: u64));
    stream_wait!(i, "[method]input-stream.blocking-skip", In, blocking_skip, (stream: Input, len: u64));
    stream_wait!(
        i,
        "[method]output-stream.blocking-write-and-flush",
        Out,
        blocking_write_and_flush,
        (stream: Output, bytes: Vec<u8>)
    );
    stream_wait!(
        i,
        "[method]output-stream.blocking-write-zeroes-and-flush",
        Out,
        blocking_write_zeroes_and_flush,
        (stream: Output, len: u64)
    );
    stream_wait!(i, "[method]output-stream.blocking-flush", Out, blocking_flush, (stream: Output));
    stream_wait!(
        i,
        "[method]output-stream.blocking-splice",
        Out,
        blocking_splice,
        (dst: Output, src: Input, len: u64)
    );
    Ok(())
}

/// `wasi:io/streams`: dropping a stream.
fn add_stream_drops(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    let mut i = linker.instance(IO_STREAMS)?;
    // Dropping a stream waits for its in-flight operation (a TCP write
    // to a peer that never reads: forever).
    i.resource(
        "input-stream",
        ResourceType::host::<DynInputStream>(),
        |mut store: StoreContextMut<'_, State>, rep: u32| -> wasmtime::Result<()> {
            let s = store.data_mut();
            wait(
                s.call.deadline,
                <ResourceTable as io_streams::HostInputStream>::drop(
                    &mut s.table,
                    Resource::new_own(rep),
                ),
            )?
        },
    )?;
    i.resource(
        "output-stream",
        ResourceType::host::<DynOutputStream>(),
        |mut store: StoreContextMut<'_, State>, rep: u32| -> wasmtime::Result<()> {
            let s = store.data_mut();
            wait(
                s.call.deadline,
                <ResourceTable as io_streams::HostOutputStream>::drop(
                    &mut s.table,
                    Resource::new_own(rep),
                ),
            )?
        },
    )?;
    Ok(())
}

/// `wasi:filesystem/types`: `open-at` and `set-times-at`.
fn add_filesystem(linker: &mut Linker<State>) -> wasmtime::Result<()> {
    let mut i = linker.instance(FS_TYPES)?;
    i.func_wrap(
        "[method]descriptor.open-at",
        |mut store: StoreContextMut<'_, State>,
         (fd, path_flags, path, oflags, flags): (
            Resource<Descriptor>,
            types::PathFlags,
            String,
            types::OpenFlags,
            types::DescriptorFlags,
        )| {
            let opened = open_at(
                &mut store.data_mut().table,
                fd,
                path_flags,
                path,
                oflags,
                flags,
            )?;
            Ok((opened,))
        },
    )?;
    i.func_wrap(
        "[method]descriptor.set-times-at",
        |mut store: StoreContextMut<'_, State>,
         (fd, path_flags, path, atim, mtim): (
            Resource<Descriptor>,
            types::PathFlags,
            String,
            types::NewTimestamp,
            types::NewTimestamp,
        )| {
            Ok((set_times_at(
                store.data_mut(),
                fd,
                path_flags,
                path,
                atim,
                mtim,
            )?,))
        },
    )?;
    Ok(())
}

/// wasmtime-wasi 48's `Dir::open_at` (src/filesystem.rs), except that the OS
/// open never waits (`O_NONBLOCK`) and only regular files and directories are
/// kept: a FIFO, socket or device in a granted directory is refused, checked
/// on the opened descriptor so nothing can be swapped in between.
fn open_at(
    table: &mut ResourceTable,
    fd: Resource<Descriptor>,
    path_flags: types::PathFlags,
    path: String,
    oflags: types::OpenFlags,
    flags: types::DescriptorFlags,
) -> wasmtime::Result<Result<Resource<Descriptor>, types::ErrorCode>> {
    use types::{DescriptorFlags as F, ErrorCode, OpenFlags as O};

    // Like upstream: a bad handle traps, a file is not-directory.
    let dir = match table.get(&fd)? {
        Descriptor::Dir(d) => d.clone(), // two Arcs and flags
        Descriptor::File(_) => return Ok(Err(ErrorCode::NotDirectory)),
    };

    let (mut opts, open_mode, create) = open_options(path_flags, oflags, flags);
    if flags.intersects(F::FILE_INTEGRITY_SYNC | F::DATA_INTEGRITY_SYNC | F::REQUESTED_WRITE_SYNC) {
        return Ok(Err(ErrorCode::Unsupported));
    }
    if oflags.contains(O::DIRECTORY)
        && (oflags.contains(O::CREATE)
            || oflags.contains(O::EXCLUSIVE)
            || oflags.contains(O::TRUNCATE))
    {
        return Ok(Err(ErrorCode::Invalid));
    }
    if dir.perms.write_not_permitted() && (create || open_mode.contains(OpenMode::WRITE)) {
        return Ok(Err(ErrorCode::NotPermitted));
    }

    // Never wait in open(): a FIFO without a peer would block until one
    // appears, a syscall no deadline can cut short.
    opts.custom_flags(OFlags::NONBLOCK.bits() as i32);
    let file = match cap_primitives::fs::open(&dir.dir, path.as_ref(), &opts) {
        Ok(f) => f,
        Err(e) => return Ok(Err(ErrorCode::from(e))),
    };
    match descriptor(file, &dir, open_mode, oflags) {
        Ok(d) => Ok(Ok(table.push(d)?)),
        Err(code) => Ok(Err(code)),
    }
}

/// The OS open options for WASI's flags, as upstream sets them, with the
/// mode the descriptor gets and whether the open may create a file.
fn open_options(
    path_flags: types::PathFlags,
    oflags: types::OpenFlags,
    flags: types::DescriptorFlags,
) -> (OpenOptions, OpenMode, bool) {
    use types::{DescriptorFlags as F, OpenFlags as O, PathFlags as P};
    let mut create = false;
    let mut open_mode = OpenMode::empty();
    let mut opts = OpenOptions::new();
    if oflags.contains(O::CREATE) {
        if oflags.contains(O::EXCLUSIVE) {
            opts.create_new(true);
        } else {
            opts.create(true);
        }
        create = true;
        opts.write(true);
        open_mode |= OpenMode::WRITE;
    }
    if oflags.contains(O::TRUNCATE) {
        opts.truncate(true).write(true);
        open_mode |= OpenMode::WRITE;
    }
    if flags.contains(F::READ) {
        opts.read(true);
        open_mode |= OpenMode::READ;
    }
    if flags.contains(F::WRITE) {
        opts.write(true);
        open_mode |= OpenMode::WRITE;
    } else {
        // Upstream: open readable so the OS allows it; perms are enforced later.
        opts.read(true);
        open_mode |= OpenMode::READ;
    }
    opts._cap_fs_ext_follow(if path_flags.contains(P::SYMLINK_FOLLOW) {
        FollowSymlinks::Yes
    } else {
        FollowSymlinks::No
    });
    (opts, open_mode, create)
}

/// The descriptor of what was opened: a directory or a regular file. A
/// FIFO, socket or device is refused (reads and writes on it could wait
/// without end; `file` is closed here).
fn descriptor(
    file: std::fs::File,
    dir: &Dir,
    open_mode: OpenMode,
    oflags: types::OpenFlags,
) -> Result<Descriptor, types::ErrorCode> {
    use types::{ErrorCode, OpenFlags as O};
    let kind = file.metadata().map_err(ErrorCode::from)?.file_type();
    if kind.is_dir() {
        Ok(Descriptor::Dir(Dir::new(
            file,
            dir.perms,
            open_mode,
            BLOCK_CURRENT_THREAD,
        )))
    } else if oflags.contains(O::DIRECTORY) {
        Err(ErrorCode::NotDirectory)
    } else if kind.is_file() {
        // Back to ordinary blocking I/O, as wasmtime-wasi expects.
        rustix::fs::fcntl_getfl(&file)
            .and_then(|fl| rustix::fs::fcntl_setfl(&file, fl.difference(OFlags::NONBLOCK)))
            .map_err(|e| ErrorCode::from(std::io::Error::from(e)))?;
        Ok(Descriptor::File(File::new(
            file,
            dir.perms,
            open_mode,
            BLOCK_CURRENT_THREAD,
        )))
    } else {
        Err(ErrorCode::NotPermitted)
    }
}

/// `set-times-at`. Without `symlink-follow` upstream never opens the target
/// (utimensat on the parent) and is used as is; with it, upstream opens the
/// target for writing, which waits on a FIFO. Here the target is resolved
/// with `O_PATH` (never waits), its type checked, and its times set through
/// `/proc/self/fd`, which does not open it either.
fn set_times_at(
    state: &mut State,
    fd: Resource<Descriptor>,
    path_flags: types::PathFlags,
    path: String,
    atim: types::NewTimestamp,
    mtim: types::NewTimestamp,
) -> wasmtime::Result<Result<(), types::ErrorCode>> {
    use types::ErrorCode;

    if !path_flags.contains(types::PathFlags::SYMLINK_FOLLOW) {
        let mut view = state.filesystem();
        let r = in_tokio(
            <WasiFilesystemCtxView<'_> as types::HostDescriptor>::set_times_at(
                &mut view, fd, path_flags, path, atim, mtim,
            ),
        );
        return match r {
            Ok(()) => Ok(Ok(())),
            Err(e) => Ok(Err(
                <WasiFilesystemCtxView<'_> as types::Host>::convert_error_code(&mut view, e)?,
            )),
        };
    }

    let dir = match state.table.get(&fd)? {
        Descriptor::Dir(d) => d,
        Descriptor::File(_) => return Ok(Err(ErrorCode::NotDirectory)),
    };
    if dir.perms.write_not_permitted() {
        return Ok(Err(ErrorCode::NotPermitted));
    }
    let times = match (timespec(atim), timespec(mtim)) {
        (Ok(a), Ok(m)) => Timestamps {
            last_access: a,
            last_modification: m,
        },
        (Err(e), _) | (_, Err(e)) => return Ok(Err(e)),
    };
    let mut opts = OpenOptions::new();
    opts.read(true)
        ._cap_fs_ext_follow(FollowSymlinks::Yes)
        .custom_flags(OFlags::PATH.bits() as i32);
    let target = match cap_primitives::fs::open(&dir.dir, path.as_ref(), &opts) {
        Ok(f) => f,
        Err(e) => return Ok(Err(ErrorCode::from(e))),
    };
    match target.metadata() {
        Ok(m) if m.is_file() || m.is_dir() => {}
        Ok(_) => return Ok(Err(ErrorCode::NotPermitted)),
        Err(e) => return Ok(Err(ErrorCode::from(e))),
    }
    let magic = format!("/proc/self/fd/{}", target.as_raw_fd());
    match rustix::fs::utimensat(rustix::fs::CWD, magic.as_str(), &times, AtFlags::empty()) {
        Ok(()) => Ok(Ok(())),
        Err(e) => Ok(Err(ErrorCode::from(std::io::Error::from(e)))),
    }
}

fn timespec(t: types::NewTimestamp) -> Result<Timespec, types::ErrorCode> {
    Ok(match t {
        types::NewTimestamp::NoChange => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_OMIT,
        },
        types::NewTimestamp::Now => Timespec {
            tv_sec: 0,
            tv_nsec: rustix::fs::UTIME_NOW,
        },
        types::NewTimestamp::Timestamp(d) => {
            // Upstream builds `Duration::new(seconds, nanoseconds)`, which
            // carries whole seconds out of the nanoseconds.
            let secs = d
                .seconds
                .checked_add(u64::from(d.nanoseconds / 1_000_000_000));
            Timespec {
                tv_sec: secs
                    .and_then(|s| i64::try_from(s).ok())
                    .ok_or(types::ErrorCode::Overflow)?,
                tv_nsec: (d.nanoseconds % 1_000_000_000).into(),
            }
        }
    })
}
