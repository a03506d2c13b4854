//! How the process uses the C allocator (glibc): few malloc arenas, and freed memory handed back after bursts.
//!
//! A cluster holds tens of thousands of small, long-lived allocations (two broker sessions and a record per worker)
//! made from whichever runtime thread happened to serve a connection. glibc gives threads their own arenas (up to 8
//! per core), which leaves each arena's free space stranded; two arenas are plenty for a 2-thread runtime. Freed
//! memory after a deploy burst or a report stays resident until trimmed.

/// Limits glibc to two malloc arenas. Call once at start, before other threads exist.
#[allow(unsafe_code)]
pub fn limit_arenas() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only sets an allocator tunable; it is called before any other thread is started, with a
        // parameter and value glibc documents (M_ARENA_MAX, a positive count).
        let ok = unsafe { libc::mallopt(libc::M_ARENA_MAX, 2) };
        if ok != 1 {
            tracing::debug!("mallopt(M_ARENA_MAX) refused; the allocator keeps its defaults");
        }
    }
}

/// Returns freed heap memory to the system.
#[allow(unsafe_code)]
pub fn trim() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: malloc_trim only releases free pages of the allocator's own heaps; it is thread-safe (it takes
        // each arena's lock) and has no preconditions.
        unsafe {
            libc::malloc_trim(0);
        }
    }
}
