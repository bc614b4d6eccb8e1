//! CPU time read from `/proc`, to say where a throughput run spends the machine: in this
//! process (the processor, the fake Request service, SQLite) or in PostgreSQL's processes. On
//! a 2-core machine a run that keeps both cores busy is bound by the CPU each item costs, so
//! the CPU per item of the processor run against the bare loop's is the ceiling of P1.

use std::time::Duration;

/// Clock ticks per second of `/proc/*/stat` (`USER_HZ`, 100 on Linux whatever the kernel's
/// own tick rate).
const TICKS_PER_SECOND: u64 = 100;

/// The CPU times of one process from `/proc/<pid>/stat`: (own user + system, reaped children's
/// user + system, parent pid).
fn stat(pid: &str) -> Option<(u64, u64, u32)> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name is in parentheses and may hold spaces: the fields follow the last `)`.
    let fields: Vec<&str> = text
        .get(text.rfind(')')? + 1..)?
        .split_whitespace()
        .collect();
    let field = |n: usize| fields.get(n)?.parse::<u64>().ok();
    // After the name: state (3), ppid (4), …, utime (14), stime (15), cutime (16), cstime (17).
    let own = field(11)? + field(12)?;
    let reaped = field(13)? + field(14)?;
    let parent = u32::try_from(field(1)?).ok()?;
    Some((own, reaped, parent))
}

fn ticks(n: u64) -> Duration {
    Duration::from_millis(n * 1_000 / TICKS_PER_SECOND)
}

/// CPU time this process has used so far, all threads.
pub(crate) fn this_process() -> Duration {
    stat("self").map_or(Duration::ZERO, |(own, _, _)| ticks(own))
}

/// CPU time process `root` and its children have used so far: its own, its live children's
/// and what its exited children left in its account.
pub(crate) fn process_tree(root: u32) -> Duration {
    let Some((own, reaped, _)) = stat(&root.to_string()) else {
        return Duration::ZERO;
    };
    let children: u64 = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .filter_map(Result::ok)
        .filter_map(|entry| {
            let name = entry.file_name().into_string().ok()?;
            name.bytes().all(|b| b.is_ascii_digit()).then_some(name)
        })
        .filter_map(|pid| stat(&pid))
        .filter(|(_, _, parent)| *parent == root)
        .map(|(own, _, _)| own)
        .sum();
    ticks(own + reaped + children)
}
