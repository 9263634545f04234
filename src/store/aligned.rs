//! A heap buffer aligned for O_DIRECT (address, and the lengths we write, multiples of
//! [`ALIGN`]), usable as a monoio I/O buffer.

use std::{
    alloc::{Layout, alloc_zeroed, dealloc},
    ptr::NonNull,
};

/// Alignment of O_DIRECT buffers, offsets and lengths (4096 is safe on every device).
pub const ALIGN: usize = 4096;

/// A fixed-capacity, 4096-aligned byte buffer.
pub struct AlignedBuf {
    ptr: NonNull<u8>,
    cap: usize,
    len: usize,
}

// SAFETY: the buffer owns its allocation exclusively, like a `Vec<u8>`.
unsafe impl Send for AlignedBuf {}

impl AlignedBuf {
    /// `cap` is rounded up to a multiple of [`ALIGN`].
    pub fn new(cap: usize) -> Self {
        let cap = cap.max(ALIGN).next_multiple_of(ALIGN);
        let layout = Layout::from_size_align(cap, ALIGN).expect("valid layout");
        // SAFETY: non-zero size.
        let ptr = NonNull::new(unsafe { alloc_zeroed(layout) })
            .unwrap_or_else(|| std::alloc::handle_alloc_error(layout));
        AlignedBuf { ptr, cap, len: 0 }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn capacity(&self) -> usize {
        self.cap
    }

    pub fn is_full(&self) -> bool {
        self.len == self.cap
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Copy as much of `data` as fits; returns how much was taken.
    pub fn fill(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(self.cap - self.len);
        // SAFETY: `n` bytes fit after `len`; the source is a distinct slice.
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(self.len), n);
        }
        self.len += n;
        n
    }

    /// Zero-pad to the next multiple of [`ALIGN`] (the O_DIRECT tail); returns the padding.
    pub fn pad_to_align(&mut self) -> usize {
        let padded = self.len.next_multiple_of(ALIGN).min(self.cap);
        // SAFETY: within capacity.
        unsafe { std::ptr::write_bytes(self.ptr.as_ptr().add(self.len), 0, padded - self.len) };
        let pad = padded - self.len;
        self.len = padded;
        pad
    }

    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: `len` bytes are initialised (zeroed at allocation, then written).
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for AlignedBuf {
    fn drop(&mut self) {
        // SAFETY: allocated in `new` with this exact layout.
        unsafe {
            dealloc(
                self.ptr.as_ptr(),
                Layout::from_size_align(self.cap, ALIGN).expect("valid layout"),
            )
        }
    }
}

// SAFETY: the pointer is stable for the buffer's life (heap allocation, never reallocated)
// and `len` bytes from it are initialised.
unsafe impl monoio::buf::IoBuf for AlignedBuf {
    fn read_ptr(&self) -> *const u8 {
        self.ptr.as_ptr()
    }

    fn bytes_init(&self) -> usize {
        self.len
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn aligned_fill_and_pad() {
        let mut b = AlignedBuf::new(10_000);
        assert_eq!(b.capacity(), 12_288);
        assert_eq!(b.as_slice().as_ptr() as usize % ALIGN, 0);
        assert_eq!(b.fill(&[7; 5000]), 5000);
        assert_eq!(b.pad_to_align(), 3192);
        assert_eq!(b.len(), 8192);
        assert!(b.as_slice()[5000..].iter().all(|&x| x == 0));
        assert_eq!(b.fill(&[1; 10_000]), 4096);
        assert!(b.is_full());
        b.clear();
        assert!(b.is_empty());
    }
}
