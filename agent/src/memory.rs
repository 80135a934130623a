//! The agent's heap: a long-lived process whose work comes in bursts (a
//! watch relist, a batch of pods starting) and that then idles for hours.
//! glibc keeps freed memory in per-thread arenas and returns it to the
//! kernel only from the top of the main heap, so without help the resident
//! size stays at the high-water mark of the last burst.

/// Keeps glibc's malloc to `arenas` arenas (unless `MALLOC_ARENA_MAX`
/// says otherwise), and large blocks (a watch list's body, say) in
/// mappings of their own. Called once at start, before any thread exists.
///
/// The agent's few runtime threads contend little, and each extra arena
/// keeps its own free memory resident, out of reach of the others: a
/// relist's garbage in one arena stays while the DNS caches fill another
/// (measured: 1.7 MiB less after `bench dns` with one arena than with two,
/// at the same rates). So one arena, except for threads that allocate on
/// every request of a busy data path (the ingress workers), which would
/// wait on one another for its lock: see [`arenas_for`].
///
/// By default glibc raises its mapping threshold each time such a block is
/// freed, after which the next ones land in the heap between long-lived
/// objects, and their pages stay resident after they are freed; a fixed
/// threshold gives them back to the kernel when they go.
pub fn limit_arenas(arenas: usize) {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets malloc tunables; it is called before the
    // process starts any thread, so no allocation runs concurrently.
    unsafe {
        if std::env::var_os("MALLOC_ARENA_MAX").is_none() {
            libc::mallopt(
                libc::M_ARENA_MAX,
                libc::c_int::try_from(arenas.max(1)).unwrap_or(libc::c_int::MAX),
            );
        }
        libc::mallopt(libc::M_MMAP_THRESHOLD, 128 * 1024);
    }
}

/// The arenas for a process with `workers` data-path threads, each
/// allocating on every request: one each, beside one for the main thread
/// and one per runtime thread (as many as cores). With one arena shared,
/// the two ingress workers of `bench ingress` waited on its lock: 0.29
/// futex calls per request from malloc and free (`perf`), none with an
/// arena each, at the same resident size.
pub fn arenas_for(workers: usize) -> usize {
    if workers == 0 {
        return 1;
    }
    let cores = std::thread::available_parallelism().map_or(1, |n| n.get());
    1 + cores + workers
}

/// Returns the heap's free pages to the kernel, in every arena. Cheap
/// enough to call after a burst of work has settled, not on a hot path.
pub fn release_free() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim takes each arena's lock and only releases pages
    // that hold no live allocation; it is safe to call from any thread.
    unsafe {
        libc::malloc_trim(0);
    }
}

/// Raises the open-file limit to its hard limit, as daemons that hold many
/// sockets do (containerd's unit, Go's runtime): the DNS server's forwards
/// and the kubelet's streams each hold one. Returns the limit in force.
pub fn raise_file_limit() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit and setrlimit only read and write the struct
    // passed, which lives on this stack frame.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 0;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                return raised.rlim_cur;
            }
        }
    }
    lim.rlim_cur
}
