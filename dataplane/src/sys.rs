//! The few system calls the data plane makes directly (the only module allowed `unsafe`).

#![allow(unsafe_code)]

use std::io;
use std::os::fd::{AsRawFd, RawFd};

/// `sendfile(2)`: copies up to `count` bytes of `file` from `offset` to the socket `out`
/// inside the kernel, without the file position moving. Returns the bytes sent (0 at the end
/// of the file); `WouldBlock` when a non-blocking socket's buffer is full.
pub fn sendfile(out: RawFd, file: &impl AsRawFd, offset: u64, count: usize) -> io::Result<usize> {
    let mut off =
        libc::off_t::try_from(offset).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: both descriptors are open for the duration of the call (the caller holds the
    // socket and the file); `off` is a valid, exclusively borrowed off_t.
    let n = unsafe { libc::sendfile(out, file.as_raw_fd(), &mut off, count) };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        // n >= 0 and bounded by count, so it fits.
        Ok(n as usize)
    }
}

/// Puts a descriptor in non-blocking mode for as long as the guard lives, then restores its
/// flags. Sockets accepted through io_uring are blocking, and io_uring ops should see them
/// that way; only our own `sendfile` loop needs `EAGAIN` instead of a blocked thread.
#[derive(Debug)]
pub struct NonBlocking {
    fd: RawFd,
    restore: Option<libc::c_int>,
}

impl NonBlocking {
    /// Sets `O_NONBLOCK` on `fd` unless it is already set.
    pub fn set(fd: RawFd) -> io::Result<Self> {
        // SAFETY: fcntl on a descriptor the caller keeps open; F_GETFL/F_SETFL take and return
        // plain ints.
        let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
        if flags < 0 {
            return Err(io::Error::last_os_error());
        }
        if flags & libc::O_NONBLOCK != 0 {
            return Ok(Self { fd, restore: None });
        }
        // SAFETY: as above.
        if unsafe { libc::fcntl(fd, libc::F_SETFL, flags | libc::O_NONBLOCK) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(Self {
            fd,
            restore: Some(flags),
        })
    }
}

impl Drop for NonBlocking {
    fn drop(&mut self) {
        if let Some(flags) = self.restore {
            // SAFETY: same descriptor, still open (the guard never outlives the socket's use).
            unsafe { libc::fcntl(self.fd, libc::F_SETFL, flags) };
        }
    }
}

/// Space of the filesystem holding `path` (`statvfs(3)`): (bytes used, bytes available to
/// unprivileged users). Like `df`, used + available is the capacity usage is measured
/// against (blocks reserved for root are neither).
#[allow(clippy::unnecessary_cast)] // the statvfs field types differ between platforms
pub fn fs_space(path: &std::path::Path) -> io::Result<(u64, u64)> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: statvfs is plain old data; all-zero is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: `c` is a valid NUL-terminated string and `st` a valid, exclusively borrowed
    // statvfs for the duration of the call.
    let rc = unsafe { libc::statvfs(c.as_ptr(), &mut st) };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    let frsize = st.f_frsize as u64;
    let used = (st.f_blocks as u64).saturating_sub(st.f_bfree as u64);
    Ok((
        used.saturating_mul(frsize),
        (st.f_bavail as u64).saturating_mul(frsize),
    ))
}

/// The initialised bytes of a monoio buffer, as a slice (for transports that copy, such as
/// QUIC streams).
pub fn io_buf_bytes<T: monoio::buf::IoBuf>(buf: &T) -> &[u8] {
    // SAFETY: `IoBuf` is an unsafe trait whose implementors guarantee that `read_ptr` points
    // at `bytes_init` initialised bytes that stay valid while the buffer is borrowed.
    unsafe { std::slice::from_raw_parts(buf.read_ptr(), buf.bytes_init()) }
}
