//! Free lists of small blocks in front of the system allocator (wasi-libc's dlmalloc),
//! for the wasm build: a request allocates and frees a few dozen small blocks (header
//! values, route names, the gate itself), and popping or pushing a list head is far
//! cheaper in the VM than dlmalloc's bins (bench/INSTRUCTIONS.md has the measurement).
//!
//! - Blocks of up to [`MAX_CACHED`] bytes are rounded up to a size class and taken from
//!   that class's list when it has one; freed ones go back to it.
//! - Bounded: a list keeps at most [`MAX_FREE`] blocks, the rest go back to dlmalloc, so
//!   the cache never holds more than a few tens of KiB.
//! - A wasm32-wasip1 module has one thread: the lists need no lock.

use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::UnsafeCell;

/// Block sizes, smallest first; a request takes the first class it fits.
const CLASSES: [usize; 6] = [16, 32, 64, 128, 256, 512];
/// The largest size served from the lists.
pub const MAX_CACHED: usize = 512;
/// Blocks each list keeps at most.
pub const MAX_FREE: usize = 64;
/// Every block is this aligned (dlmalloc gives as much), so any small layout fits.
const ALIGN: usize = 16;

pub struct AllocCache {
    lists: UnsafeCell<[List; CLASSES.len()]>,
}

#[derive(Clone, Copy)]
struct List {
    head: *mut u8,
    len: usize,
}

// SAFETY: the module is single-threaded (wasm32-wasip1 has no threads), so the lists
// are never touched from two threads.
unsafe impl Sync for AllocCache {}

impl AllocCache {
    pub const fn new() -> AllocCache {
        AllocCache {
            lists: UnsafeCell::new(
                [List {
                    head: std::ptr::null_mut(),
                    len: 0,
                }; CLASSES.len()],
            ),
        }
    }
}

impl Default for AllocCache {
    fn default() -> AllocCache {
        AllocCache::new()
    }
}

/// The class of a layout, if it is served from the lists.
fn class_of(layout: Layout) -> Option<(usize, usize)> {
    if layout.align() > ALIGN || layout.size() > MAX_CACHED {
        return None;
    }
    CLASSES
        .iter()
        .position(|&c| layout.size() <= c)
        .and_then(|i| Some((i, *CLASSES.get(i)?)))
}

fn block_layout(size: usize) -> Layout {
    // A class size and ALIGN always make a valid layout.
    Layout::from_size_align(size, ALIGN).unwrap_or(Layout::new::<[u8; MAX_CACHED]>())
}

// SAFETY (all methods): a block in a list came from `System` with its class's layout, is
// unused, and holds the next block's address in its first bytes (every class holds a
// pointer); blocks of a class are handed out and taken back with that same class, since
// a layout's class depends only on its size and alignment.
unsafe impl GlobalAlloc for AllocCache {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        let Some((i, size)) = class_of(layout) else {
            return System.alloc(layout);
        };
        let lists = &mut *self.lists.get();
        if let Some(list) = lists.get_mut(i) {
            if !list.head.is_null() {
                let block = list.head;
                list.head = block.cast::<*mut u8>().read();
                list.len -= 1;
                return block;
            }
        }
        System.alloc(block_layout(size))
    }

    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        let Some((i, size)) = class_of(layout) else {
            return System.dealloc(ptr, layout);
        };
        let lists = &mut *self.lists.get();
        match lists.get_mut(i) {
            Some(list) if list.len < MAX_FREE => {
                ptr.cast::<*mut u8>().write(list.head);
                list.head = ptr;
                list.len += 1;
            }
            _ => System.dealloc(ptr, block_layout(size)),
        }
    }

    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        let old = class_of(layout);
        let new_layout = Layout::from_size_align_unchecked(new_size, layout.align());
        match (old, class_of(new_layout)) {
            // Same class: the block already has the room.
            (Some((i, _)), Some((j, _))) if i == j => ptr,
            // Neither is a cached block: dlmalloc may grow it in place.
            (None, None) => System.realloc(ptr, layout, new_size),
            _ => {
                let new = self.alloc(new_layout);
                if !new.is_null() {
                    std::ptr::copy_nonoverlapping(ptr, new, layout.size().min(new_size));
                    self.dealloc(ptr, layout);
                }
                new
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_reused_per_class_and_bounded() {
        let cache = AllocCache::new();
        let small = Layout::from_size_align(24, 8).unwrap();
        unsafe {
            let a = cache.alloc(small);
            assert!(!a.is_null());
            a.write_bytes(0xab, 24);
            cache.dealloc(a, small);
            // The same class (17..=32 bytes) gets the block back.
            let b = cache.alloc(Layout::from_size_align(30, 4).unwrap());
            assert_eq!(a, b);
            cache.dealloc(b, Layout::from_size_align(30, 4).unwrap());
            // Many frees: the list keeps MAX_FREE, the rest go back.
            let blocks: Vec<_> = (0..MAX_FREE + 10).map(|_| cache.alloc(small)).collect();
            for p in &blocks {
                cache.dealloc(*p, small);
            }
            assert_eq!((*cache.lists.get())[1].len, MAX_FREE);
            // Large or very aligned layouts are not cached.
            let big = Layout::from_size_align(MAX_CACHED + 1, 8).unwrap();
            assert_eq!(class_of(big), None);
            assert_eq!(class_of(Layout::from_size_align(8, 64).unwrap()), None);
            let p = cache.alloc(big);
            cache.dealloc(p, big);
        }
    }

    #[test]
    fn realloc_keeps_the_bytes_across_classes() {
        let cache = AllocCache::new();
        unsafe {
            let l = Layout::from_size_align(10, 1).unwrap();
            let p = cache.alloc(l);
            for i in 0..10u8 {
                p.add(usize::from(i)).write(i);
            }
            let same = cache.realloc(p, l, 16);
            assert_eq!(same, p, "16 bytes still fit the 16-byte class");
            let l16 = Layout::from_size_align(16, 1).unwrap();
            let grown = cache.realloc(same, l16, 1000);
            for i in 0..10u8 {
                assert_eq!(grown.add(usize::from(i)).read(), i);
            }
            let l1000 = Layout::from_size_align(1000, 1).unwrap();
            let shrunk = cache.realloc(grown, l1000, 40);
            for i in 0..10u8 {
                assert_eq!(shrunk.add(usize::from(i)).read(), i);
            }
            cache.dealloc(shrunk, Layout::from_size_align(40, 1).unwrap());
        }
    }
}
