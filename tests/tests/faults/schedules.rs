//! F4 and F8 (issue 9): a schedule fires exactly once per (job, instant, group).
//!
//! F4 races three replicas on one PostgreSQL database over 500 schedules with a seconds field
//! while one replica is killed (and restarted) and another frozen (SIGSTOP, then SIGCONT); F8
//! stops one server for longer than several intervals, twice, and checks what each misfire
//! policy fired at the restart. The checkers compute every expected instant themselves (the
//! schedules are `offset/period` seconds fields, simple enough to enumerate without the
//! product's schedule code) and read `occurrences` and `runs`.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::{Duration, Instant, UNIX_EPOCH};

use batch_e2e::Server;
use batch_testkit::Backend;
use sea_orm::{ConnectionTrait, Database, DatabaseConnection, Statement};

use super::{Report, database, env_number, next, one_at_a_time, request_service, seed, tokens};

/// The misfire policies' grace: a fire up to this late is on time under every policy
/// (`batch_domain::misfire::ON_TIME`).
const ON_TIME_MS: i64 = 60_000;

/// A schedule of these scenarios: second `offset`, `offset + period`, … of every minute.
#[derive(Debug, Clone, Copy)]
struct Seconds {
    /// The first second of each minute that fires (below `period`).
    offset: u64,
    /// Seconds between fires within a minute, 1–60.
    period: u64,
}

impl Seconds {
    /// Its cron expression (with a seconds field).
    fn cron(self) -> String {
        if self.period >= 60 {
            format!("{} * * * * *", self.offset)
        } else {
            format!("{}/{} * * * * *", self.offset, self.period)
        }
    }

    /// Whether it fires at `ms` (milliseconds since the epoch).
    fn fires(self, ms: i64) -> bool {
        let second = u64::try_from(ms.div_euclid(1_000).rem_euclid(60)).unwrap();
        ms.rem_euclid(1_000) == 0
            && second >= self.offset
            && (second - self.offset).is_multiple_of(self.period)
    }

    /// Its instants (milliseconds since the epoch) in `from..=to`, oldest first.
    fn instants(self, from: i64, to: i64) -> impl Iterator<Item = i64> {
        let first = from.div_euclid(1_000) + i64::from(from.rem_euclid(1_000) != 0);
        (first..=to.div_euclid(1_000))
            .map(|second| second * 1_000)
            .filter(move |ms| self.fires(*ms))
    }
}

/// Now, in milliseconds since the epoch (the servers' clock: they run on this machine).
fn now_ms() -> i64 {
    i64::try_from(UNIX_EPOCH.elapsed().unwrap().as_millis()).unwrap()
}

/// Sleeps until `at` (milliseconds since the epoch): the planned moment of a fault.
async fn sleep_until(at: i64) {
    let wait = at - now_ms();
    if wait > 0 {
        tokio::time::sleep(Duration::from_millis(u64::try_from(wait).unwrap())).await;
    }
}

/// Writes a jobs file of one-user `INDIVIDUAL_USERS` jobs of tenant `fault`, one per (id,
/// schedule, misfire policy), each `overlap: allow_all` so that every fire makes a run; returns
/// its path.
fn schedule_jobs(name: &str, jobs: &[(String, Seconds, serde_json::Value)]) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("batch-faults-{name}-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let jobs: Vec<serde_json::Value> = jobs
        .iter()
        .map(|(id, schedule, misfire)| {
            serde_json::json!({
                "id": id, "tenant": "fault", "type": "INDIVIDUAL_USERS", "template": "digest",
                "source": {"users": {"ids": ["user000000"]}},
                "schedule": {"cron": schedule.cron()},
                "execution": {"concurrency": 1, "chunk_size": 1, "timeout_ms": 10000},
                "retry": {"max_attempts": 3, "initial_backoff_ms": 10, "max_backoff_ms": 50},
                "overlap": "allow_all",
                "misfire": misfire,
            })
        })
        .collect();
    let path = dir.join("jobs.json");
    std::fs::write(
        &path,
        serde_json::to_vec_pretty(&serde_json::json!({ "jobs": jobs })).unwrap(),
    )
    .unwrap();
    path
}

/// A schedule's fire as the database holds it: (job, group, nominal instant in ms).
type FireKey = (String, String, i64);

/// What the database says the schedules fired.
#[derive(Debug, Default)]
struct Fired {
    /// Scheduled runs per (job, group, nominal instant): how many, and when the first was
    /// created (ms).
    runs: BTreeMap<FireKey, (usize, i64)>,
    /// Occurrences per (job, group, nominal instant): when each was created (ms).
    occurrences: BTreeMap<FireKey, i64>,
    /// Scheduled runs that name no occurrence.
    unlinked: usize,
}

impl Fired {
    /// Reads `runs` (trigger `scheduled`) and `occurrences`.
    async fn read(conn: &DatabaseConnection) -> Fired {
        let query = |sql: &str| {
            conn.query_all_raw(Statement::from_string(
                conn.get_database_backend(),
                sql.to_owned(),
            ))
        };
        let mut fired = Fired::default();
        for row in query(
            "SELECT job_id, group_key, scheduled_for_ms, COUNT(*) AS n, MIN(created_ms) AS first \
             FROM runs WHERE trigger = 'scheduled' GROUP BY job_id, group_key, scheduled_for_ms",
        )
        .await
        .unwrap()
        {
            let n: i64 = row.try_get("", "n").unwrap();
            fired.runs.insert(
                (
                    row.try_get("", "job_id").unwrap(),
                    row.try_get("", "group_key").unwrap(),
                    row.try_get("", "scheduled_for_ms").unwrap(),
                ),
                (
                    usize::try_from(n).unwrap(),
                    row.try_get("", "first").unwrap(),
                ),
            );
        }
        for row in query("SELECT job_id, group_key, nominal_ms, created_ms FROM occurrences")
            .await
            .unwrap()
        {
            fired.occurrences.insert(
                (
                    row.try_get("", "job_id").unwrap(),
                    row.try_get("", "group_key").unwrap(),
                    row.try_get("", "nominal_ms").unwrap(),
                ),
                row.try_get("", "created_ms").unwrap(),
            );
        }
        let unlinked = query(
            "SELECT COUNT(*) AS n FROM runs WHERE trigger = 'scheduled' AND occurrence_id IS NULL",
        )
        .await
        .unwrap();
        let n: i64 = unlinked[0].try_get("", "n").unwrap();
        fired.unlinked = usize::try_from(n).unwrap();
        fired
    }

    /// How many scheduled runs `job` (group `""`) has at `nominal`.
    fn runs_at(&self, job: &str, nominal: i64) -> usize {
        self.runs
            .get(&(job.to_owned(), String::new(), nominal))
            .map_or(0, |(n, _)| *n)
    }

    /// Runs that are not a schedule's fire at all (unknown job, a group these jobs do not
    /// have, an instant that is not the schedule's, no occurrence), plus runs beyond the first
    /// per (job, instant, group).
    fn extra(&self, schedules: &BTreeMap<String, Seconds>) -> usize {
        let mut extra = self.unlinked;
        for ((job, group, nominal), (n, _)) in &self.runs {
            let belongs = group.is_empty() && schedules.get(job).is_some_and(|s| s.fires(*nominal));
            extra += if belongs { n - 1 } else { *n };
        }
        extra
    }

    /// Instants of `schedules` in `from..=to` without a run.
    fn missed(&self, schedules: &BTreeMap<String, Seconds>, from: i64, to: i64) -> usize {
        schedules
            .iter()
            .map(|(job, schedule)| {
                schedule
                    .instants(from, to)
                    .filter(|n| self.runs_at(job, *n) == 0)
                    .count()
            })
            .sum()
    }
}

/// Sends `signal` (`STOP`, `CONT`) to `server`.
fn signal(server: &Server, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([format!("-{signal}"), server.pid().to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{signal} failed: {status:?}");
}

/// The faults of F4, in the order they happen.
#[derive(Debug, Clone, Copy)]
enum Fault {
    /// SIGKILL of the killed replica.
    Kill,
    /// The killed replica starts again.
    Restart,
    /// SIGSTOP of the frozen replica.
    Freeze,
    /// SIGCONT of the frozen replica.
    Thaw,
}

/// F4: three replicas on one PostgreSQL database race 500 schedules firing every 1–60 s
/// (`FAULTS_F4_SCHEDULES`, `FAULTS_F4_SECS` seconds, default 60); at random points one replica
/// is killed (and restarted a few seconds later) and another frozen for a few seconds. Every
/// instant inside the window has exactly one run: 0 missed, 0 extra. The jobs catch up
/// (`catch_up`, one hour), so a fire a dead or frozen replica owed is still due for the others.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f4_racing_replicas_fire_every_instant_exactly_once() {
    let _serial = one_at_a_time().await;
    let secs = env_number("FAULTS_F4_SECS", 60).max(20);
    let count = env_number("FAULTS_F4_SCHEDULES", 500);
    let mut seed = seed();
    let initial = seed;
    eprintln!("F4 seed {seed}: {count} schedules, {secs} s");
    let Some(db) = database(Backend::Postgres, 1).await else {
        return;
    };
    let (_requests, fake) = request_service(Duration::ZERO).await;
    let schedules: BTreeMap<String, Seconds> = (0..count)
        .map(|n| {
            let period = 1 + next(&mut seed) % 60;
            let offset = next(&mut seed) % period;
            (format!("f4-{n:04}"), Seconds { offset, period })
        })
        .collect();
    let catch_up = serde_json::json!({"policy": "catch_up", "window_seconds": 3600});
    let jobs: Vec<_> = schedules
        .iter()
        .map(|(id, s)| (id.clone(), *s, catch_up.clone()))
        .collect();
    let jobs = schedule_jobs("f4", &jobs);
    let endpoint = fake.url();
    let tokens = tokens();
    let args = [
        "--external-tables",
        "true",
        "--request-endpoint",
        endpoint.as_str(),
        "--tokens",
        tokens.as_str(),
    ];
    let start = || tokio::task::block_in_place(|| Server::start(&db.url, Some(&jobs), &args));
    let mut replicas: Vec<Option<Server>> = (0..3).map(|_| Some(start())).collect();
    // Every instant from here to `to` must fire, whatever the faults.
    let from = now_ms() + 2_000;
    let span = i64::try_from(secs * 1_000).unwrap();
    let to = from + span;
    let mut fraction =
        |low: u64, width: u64| span * i64::try_from(low + next(&mut seed) % width).unwrap() / 100;
    let kill_at = from + fraction(10, 40);
    let freeze_at = from + fraction(10, 60);
    let restart_at = kill_at + 3_000 + i64::try_from(next(&mut seed) % 7_000).unwrap();
    let thaw_at = freeze_at + 2_000 + i64::try_from(next(&mut seed) % 6_000).unwrap();
    let killed = usize::try_from(next(&mut seed) % 3).unwrap();
    let frozen = (killed + 1 + usize::try_from(next(&mut seed) % 2).unwrap()) % 3;
    eprintln!(
        "F4 plan: replica {killed} killed at +{:.1} s, restarted at +{:.1} s; replica {frozen} \
         frozen at +{:.1} s, thawed at +{:.1} s; window {secs} s",
        (kill_at - from) as f64 / 1e3,
        (restart_at - from) as f64 / 1e3,
        (freeze_at - from) as f64 / 1e3,
        (thaw_at - from) as f64 / 1e3,
    );
    let mut faults = [
        (kill_at, Fault::Kill),
        (restart_at, Fault::Restart),
        (freeze_at, Fault::Freeze),
        (thaw_at, Fault::Thaw),
    ];
    faults.sort_by_key(|f| f.0);
    let mut fault_end = from;
    for (at, fault) in faults {
        sleep_until(at).await;
        match fault {
            Fault::Kill => {
                let server = replicas[killed].take().unwrap();
                tokio::task::block_in_place(|| server.kill());
            }
            Fault::Restart => replicas[killed] = Some(start()),
            Fault::Freeze => signal(replicas[frozen].as_ref().unwrap(), "STOP"),
            Fault::Thaw => signal(replicas[frozen].as_ref().unwrap(), "CONT"),
        }
        fault_end = now_ms();
    }
    sleep_until(to).await;
    // The replicas lag behind the clock when this machine is busy: wait for the window's last
    // instants before judging, as long as fires keep coming (one a minute at least), at most
    // half an hour.
    let conn = Database::connect(db.url.as_str()).await.unwrap();
    let give_up = Instant::now() + Duration::from_secs(1_800);
    let mut progress = Instant::now();
    let mut fired = Fired::read(&conn).await;
    let mut missing = fired.missed(&schedules, from, to);
    while missing > 0 && progress.elapsed() < Duration::from_secs(60) && Instant::now() < give_up {
        tokio::time::sleep(Duration::from_millis(500)).await;
        fired = Fired::read(&conn).await;
        let now_missing = fired.missed(&schedules, from, to);
        if now_missing < missing {
            progress = Instant::now();
        }
        missing = now_missing;
    }
    let caught_up = now_ms();
    let expected: usize = schedules
        .values()
        .map(|s| s.instants(from, to).count())
        .sum();
    // How late the fires were: the worst in the window, and the last one owed when the last
    // fault ended (the recovery).
    let mut latest = 0_i64;
    let mut recovered = fault_end;
    for ((job, _, nominal), (_, created)) in &fired.runs {
        if schedules.contains_key(job) && (from..=to).contains(nominal) {
            latest = latest.max(created - nominal);
            if *nominal <= fault_end {
                recovered = recovered.max(*created);
            }
        }
    }
    let mut report = Report::new("F4");
    report.seed = Some(initial);
    report.missed = fired.missed(&schedules, from, to);
    report.extra = fired.extra(&schedules);
    report.recovery_s = Some((recovered - fault_end) as f64 / 1e3);
    eprintln!(
        "F4: {expected} instants in the window, {} scheduled runs in all, {} occurrences; worst \
         lateness {:.1} s; caught up {:.1} s after the window",
        fired.runs.values().map(|(n, _)| n).sum::<usize>(),
        fired.occurrences.len(),
        latest as f64 / 1e3,
        (caught_up - to) as f64 / 1e3,
    );
    conn.close().await.unwrap();
    report.holds();
    for server in replicas.into_iter().flatten() {
        let status = tokio::task::block_in_place(|| server.terminate());
        assert!(status.success(), "exit {status:?}");
    }
    let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
}

/// A misfire policy of `batch_domain::config::Misfire`, with what it fires at a restart.
#[derive(Debug, Clone, Copy)]
enum Policy {
    /// `skip`: missed fires are dropped; fires at most a minute late are on time.
    Skip,
    /// `fire_once`: the most recent due fire, once, in place of all of them, when any was
    /// missed (more than a minute late); otherwise each of them.
    FireOnce,
    /// `catch_up` with a window (ms): every due fire inside the window (or on time).
    CatchUp(i64),
}

impl Policy {
    /// Its `misfire` object in the jobs file.
    fn json(self) -> serde_json::Value {
        match self {
            Policy::Skip => serde_json::json!({"policy": "skip"}),
            Policy::FireOnce => serde_json::json!({"policy": "fire_once"}),
            Policy::CatchUp(window) => {
                serde_json::json!({"policy": "catch_up", "window_seconds": window / 1_000})
            }
        }
    }

    /// Whether the first tick after a restart, at `tick`, fires `nominal`, one of the due
    /// instants `due` (oldest first).
    fn fires(self, due: &[i64], nominal: i64, tick: i64) -> bool {
        match self {
            Policy::Skip => tick - nominal <= ON_TIME_MS,
            Policy::FireOnce => {
                due.last() == Some(&nominal)
                    || due
                        .first()
                        .is_some_and(|oldest| tick - oldest <= ON_TIME_MS)
            }
            Policy::CatchUp(window) => tick - nominal <= window.max(ON_TIME_MS),
        }
    }
}

/// Waits (bounded) until every job of `schedules` has a run at its last instant up to `at`.
async fn wait_for_fires(conn: &DatabaseConnection, schedules: &BTreeMap<String, Seconds>, at: i64) {
    let deadline = Instant::now() + Duration::from_secs(90);
    loop {
        let fired = Fired::read(conn).await;
        let done = schedules.iter().all(|(job, s)| {
            s.instants(at - 60_000, at)
                .last()
                .is_none_or(|last| fired.runs_at(job, last) > 0)
        });
        if done {
            return;
        }
        if Instant::now() > deadline {
            eprintln!("the fires up to {at} did not all come; the checker will say which");
            return;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// F8: one server with a job per misfire policy, each firing every 2 s, is killed twice: down
/// 7 s (every policy catches up: the fires due are all still on time) and down
/// `FAULTS_F8_DOWN_SECS` (default 75: past the minute a fire stays on time, so `skip` drops
/// the oldest, `fire_once` fires the latest only, `catch_up` with 66 s drops fewer than
/// `skip`, `catch_up` with an hour none). At each
/// restart the first tick fires what the job's policy says, each instant once; every other
/// instant fires exactly once. The moment of that first tick is known only between the
/// restart and its first fire: the checker takes the moment in that interval that explains
/// the fires best.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn f8_each_misfire_policy_holds_across_a_downtime() {
    let _serial = one_at_a_time().await;
    let long = env_number("FAULTS_F8_DOWN_SECS", 75);
    let Some(db) = database(Backend::Postgres, 1).await else {
        return;
    };
    let (_requests, fake) = request_service(Duration::ZERO).await;
    let policies: BTreeMap<String, (Seconds, Policy)> = [
        ("f8-skip", Policy::Skip),
        ("f8-fire-once", Policy::FireOnce),
        ("f8-catch-up-1h", Policy::CatchUp(3_600_000)),
        ("f8-catch-up-66s", Policy::CatchUp(66_000)),
    ]
    .into_iter()
    .enumerate()
    .map(|(n, (id, policy))| {
        let offset = u64::try_from(n).unwrap() % 2;
        (id.to_owned(), (Seconds { offset, period: 2 }, policy))
    })
    .collect();
    let schedules: BTreeMap<String, Seconds> = policies
        .iter()
        .map(|(id, (s, _))| (id.clone(), *s))
        .collect();
    let jobs: Vec<_> = policies
        .iter()
        .map(|(id, (s, p))| (id.clone(), *s, p.json()))
        .collect();
    let jobs = schedule_jobs("f8", &jobs);
    let endpoint = fake.url();
    let tokens = tokens();
    let args = [
        "--external-tables",
        "true",
        "--request-endpoint",
        endpoint.as_str(),
        "--tokens",
        tokens.as_str(),
    ];
    let start = || tokio::task::block_in_place(|| Server::start(&db.url, Some(&jobs), &args));
    let conn = Database::connect(db.url.as_str()).await.unwrap();
    let mut server = start();
    let from = now_ms() + 1_000;
    // (killed at, restarted at) per downtime.
    let mut downs = Vec::new();
    for down in [7, long] {
        wait_for_fires(&conn, &schedules, now_ms() + 5_000).await;
        let killed = now_ms();
        tokio::task::block_in_place(|| server.kill());
        tokio::time::sleep(Duration::from_secs(down)).await;
        let restarted = now_ms();
        server = start();
        downs.push((killed, restarted));
    }
    let to = now_ms() + 5_000;
    wait_for_fires(&conn, &schedules, to).await;
    let status = tokio::task::block_in_place(|| server.terminate());
    assert!(status.success(), "exit {status:?}");
    let fired = Fired::read(&conn).await;
    conn.close().await.unwrap();

    let mut report = Report::new("F8");
    report.extra = fired.extra(&schedules);
    // The first tick after each restart came after the restart and no later than the first
    // occurrence it created.
    let ticks: Vec<(i64, i64)> = downs
        .iter()
        .map(|(_, restarted)| {
            let first = fired
                .occurrences
                .values()
                .filter(|created| **created >= *restarted)
                .min()
                .copied()
                .unwrap_or(*restarted);
            (*restarted, first)
        })
        .collect();
    report.recovery_s = ticks
        .iter()
        .map(|(restarted, first)| (first - restarted) as f64 / 1e3)
        .reduce(f64::max);
    for (job, (schedule, policy)) in &policies {
        // The last instant each downtime found fired: its occurrence was made before the kill.
        let before: Vec<i64> = downs
            .iter()
            .map(|(killed, _)| {
                fired
                    .occurrences
                    .iter()
                    .filter(|((j, _, _), created)| j == job && **created < *killed)
                    .map(|((_, _, nominal), _)| *nominal)
                    .max()
                    .unwrap_or(from - 1)
            })
            .collect();
        // Up to the first kill, every instant fires.
        let missed = schedule
            .instants(from, before[0])
            .filter(|n| fired.runs_at(job, *n) == 0)
            .count();
        report.missed += missed;
        let mut story = format!("{job} ({policy:?}): up to the first kill {missed} missed");
        for (i, (low, high)) in ticks.iter().enumerate() {
            // From the last fire before the kill to the next downtime's, the restart's first
            // tick fires what the policy says of the instants due then, and every later
            // instant fires on time.
            let region: Vec<i64> = schedule
                .instants(before[i] + 1, before.get(i + 1).copied().unwrap_or(to))
                .collect();
            let errors = |tick: i64| {
                let due: Vec<i64> = region.iter().copied().filter(|n| *n <= tick).collect();
                // Wrong instants, as seconds after the restart: `-` missed, `+` extra.
                let mut wrong = Vec::new();
                for nominal in &region {
                    let expected = *nominal > tick || policy.fires(&due, *nominal, tick);
                    let ran = fired.runs_at(job, *nominal) > 0;
                    if expected != ran {
                        let sign = if expected { '-' } else { '+' };
                        wrong.push(format!("{sign}{:.1}", (nominal - low) as f64 / 1e3));
                    }
                }
                (wrong, due.len())
            };
            let (tick, (wrong, due)) = (*low..=*high)
                .step_by(50)
                .map(|tick| (tick, errors(tick)))
                .min_by_key(|(_, (wrong, _))| wrong.len())
                .unwrap();
            let missed = wrong.iter().filter(|w| w.starts_with('-')).count();
            let extra = wrong.len() - missed;
            let ran = region
                .iter()
                .filter(|n| **n <= tick && fired.runs_at(job, **n) > 0)
                .count();
            story.push_str(&format!(
                "; restart {}: {due} due at its first tick (+{:.1} s), {ran} fired, {missed} \
                 missed, {extra} extra {wrong:?}",
                i + 1,
                (tick - low) as f64 / 1e3
            ));
            report.missed += missed;
            report.extra += extra;
        }
        eprintln!("F8 {story}");
    }
    let runs: usize = fired.runs.values().map(|(n, _)| n).sum();
    eprintln!(
        "F8: {runs} scheduled runs; down 7 s and {long} s; first fire {:?} s after each restart",
        ticks
            .iter()
            .map(|(low, high)| (high - low) as f64 / 1e3)
            .collect::<Vec<_>>()
    );
    report.holds();
    drop(fake);
    let _ = std::fs::remove_dir_all(jobs.parent().unwrap());
}
