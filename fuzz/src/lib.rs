//! Shared by every fuzz target: an allocator that turns an oversized allocation into a crash.
//!
//! libFuzzer's `-malloc_limit_mb` needs a sanitizer's malloc hooks, and `-rss_limit_mb` does
//! not see a huge allocation that is never touched, so each target installs [`CappedAlloc`]:
//! any single allocation over [`MAX_ALLOCATION`] prints its size and aborts, and libFuzzer
//! keeps the input that caused it. A length declared by the input is never a valid reason to
//! allocate that much (STYLE.md, point 8).

use std::alloc::{GlobalAlloc, Layout, System};
use std::io::Write as _;

/// Largest single allocation a target may make. Inputs are at most a few KiB (libFuzzer's
/// `-max_len`, 4096 by default) and the largest legitimate buffer in any parser is a frame
/// bitmap of 128 KiB, so 32 MiB can only come from trusting a declared length.
pub const MAX_ALLOCATION: usize = 32 << 20;

/// [`System`] with a cap of [`MAX_ALLOCATION`] bytes per allocation.
pub struct CappedAlloc;

#[cold]
fn too_big(size: usize) -> ! {
    // No allocation here: stderr is unbuffered and the message is formatted on the stack.
    let mut buf = [0u8; 96];
    let mut cursor = std::io::Cursor::new(&mut buf[..]);
    let _ =
        write!(cursor, "\n==fuzz== allocation of {size} bytes over the cap of {MAX_ALLOCATION}\n");
    let n = cursor.position() as usize;
    let _ = std::io::stderr().write_all(&buf[..n]);
    std::process::abort();
}

// SAFETY: every call is forwarded unchanged to `System`, which upholds the contract; the
// only addition is aborting (never unwinding) before an oversized request reaches it.
unsafe impl GlobalAlloc for CappedAlloc {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            too_big(layout.size());
        }
        System.alloc(layout)
    }
    unsafe fn alloc_zeroed(&self, layout: Layout) -> *mut u8 {
        if layout.size() > MAX_ALLOCATION {
            too_big(layout.size());
        }
        System.alloc_zeroed(layout)
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        if new_size > MAX_ALLOCATION {
            too_big(new_size);
        }
        System.realloc(ptr, layout, new_size)
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        System.dealloc(ptr, layout)
    }
}
