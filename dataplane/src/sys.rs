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

/// The result of a read/write-style system call: the byte count, `None` when it was
/// interrupted (call again), or the error in `errno`.
fn retry_result(n: isize) -> io::Result<Option<usize>> {
    if n >= 0 {
        // n >= 0, so it fits.
        return Ok(Some(n as usize));
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::Interrupted {
        Ok(None)
    } else {
        Err(e)
    }
}

/// The error of an upload whose task file ends before the piece it sends.
pub(crate) fn short_task_file() -> io::Error {
    io::Error::new(
        io::ErrorKind::UnexpectedEof,
        "task file is shorter than the piece being sent",
    )
}

/// `pread(2)` of exactly `len` bytes of `file` at `offset`, appended to `buf` without
/// zeroing its spare capacity first (QUIC uploads hand a fresh buffer to quinn for every
/// chunk; zeroing 1 MiB before reading over it was a measurable share of the sender's CPU).
/// A file shorter than `offset + len` is an `UnexpectedEof` error; `buf` then holds the
/// bytes read so far.
pub fn pread_append(
    file: &impl AsRawFd,
    buf: &mut bytes::BytesMut,
    offset: u64,
    len: usize,
) -> io::Result<()> {
    buf.reserve(len);
    let mut done = 0usize;
    while done < len {
        let at = offset
            .checked_add(done as u64)
            .and_then(|o| libc::off_t::try_from(o).ok())
            .ok_or_else(|| io::Error::from(io::ErrorKind::InvalidInput))?;
        let spare = buf.spare_capacity_mut();
        let want = (len - done).min(spare.len());
        // SAFETY: `spare` is writable memory of at least `want` bytes owned by `buf`, which is
        // exclusively borrowed; the descriptor is open for the call.
        let n = unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), want, at) };
        let Some(n) = retry_result(n)? else {
            continue;
        };
        if n == 0 {
            return Err(short_task_file());
        }
        // SAFETY: the kernel initialised the first `n` (≤ `want`) bytes of the spare capacity.
        unsafe { buf.set_len(buf.len() + n) };
        done += n;
    }
    Ok(())
}

/// Most slices one `pwritev(2)` call takes (the kernel's `IOV_MAX` is 1024).
const PWRITEV_MAX: usize = 64;

/// Writes all of `parts`, back to back, at `offset` of `file` with `pwritev(2)`: one system
/// call for a chunk that arrived in many buffers (QUIC packets) instead of one per buffer.
pub fn pwritev_all(file: &impl AsRawFd, parts: &[&[u8]], offset: u64) -> io::Result<()> {
    let mut rest: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
    let mut at = offset;
    let mut first = 0usize;
    while first < rest.len() {
        let iov: Vec<libc::iovec> = rest[first..]
            .iter()
            .take(PWRITEV_MAX)
            .map(|p| libc::iovec {
                iov_base: p.as_ptr() as *mut libc::c_void,
                iov_len: p.len(),
            })
            .collect();
        let off =
            libc::off_t::try_from(at).map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        // SAFETY: every iovec points at a live slice borrowed for the call, the kernel only
        // reads them; the count is at most PWRITEV_MAX, well under IOV_MAX.
        let n = unsafe { libc::pwritev(file.as_raw_fd(), iov.as_ptr(), iov.len() as i32, off) };
        let Some(n) = retry_result(n)? else {
            continue;
        };
        if n == 0 {
            return Err(io::Error::from(io::ErrorKind::WriteZero));
        }
        let mut n = n;
        at += n as u64;
        while n > 0 && first < rest.len() {
            let len = rest[first].len();
            if n >= len {
                n -= len;
                first += 1;
            } else {
                rest[first] = &rest[first][n..];
                n = 0;
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    #[test]
    fn pread_append_reads_the_range_and_reports_a_short_file() {
        let mut f = tempfile::tempfile().expect("temp file");
        let data: Vec<u8> = (0..200_000u32).map(|i| (i % 251) as u8).collect();
        f.write_all(&data).expect("write");
        let mut buf = bytes::BytesMut::from(&b"head"[..]);
        pread_append(&f, &mut buf, 1000, 150_000).expect("read");
        assert_eq!(&buf[..4], b"head");
        assert_eq!(&buf[4..], &data[1000..151_000]);
        let mut short = bytes::BytesMut::new();
        let err = pread_append(&f, &mut short, 150_000, 60_000).expect_err("past the end");
        assert_eq!(err.kind(), io::ErrorKind::UnexpectedEof);
        assert_eq!(&short[..], &data[150_000..]);
    }

    #[test]
    fn pwritev_all_writes_every_part_in_order() {
        let f = tempfile::tempfile().expect("temp file");
        let parts: Vec<Vec<u8>> = (0..150u32)
            .map(|i| vec![(i % 256) as u8; 1000 + i as usize])
            .collect();
        let slices: Vec<&[u8]> = parts.iter().map(Vec::as_slice).collect();
        pwritev_all(&f, &slices, 4096).expect("write");
        let want: Vec<u8> = parts.concat();
        let mut got = vec![0u8; want.len()];
        std::os::unix::fs::FileExt::read_exact_at(&f, &mut got, 4096).expect("read back");
        assert_eq!(got, want);
    }
}
