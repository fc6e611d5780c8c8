//! Start-up and shutdown: resource limits, the file root, one pinned shard
//! per CPU of the affinity mask, and signals.

use std::io::{self, Read, Write};
use std::net::{SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use nix::sys::resource::{Resource, getrlimit, setrlimit};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::{Gid, Uid, User};

use crate::config::Config;
use crate::files::FileRoot;
use crate::hook::Hook;
use crate::log;
use crate::metrics::{Exporter, Listening};
use crate::notify;
use crate::paths::PathRules;
use crate::policy::NameProbe;
use crate::remap::{self, RemapContext};
use crate::shard::{self, Command, ShardConfig, ShardHandle};

/// The CPUs this process may run on (honours taskset, systemd
/// CPUAffinity and container cpusets).
pub fn allowed_cpus() -> Vec<usize> {
    use nix::sched::{CpuSet, sched_getaffinity};
    use nix::unistd::Pid;
    match sched_getaffinity(Pid::from_raw(0)) {
        Ok(set) => (0..CpuSet::count())
            .filter(|&cpu| set.is_set(cpu).unwrap_or(false))
            .collect(),
        Err(_) => Vec::new(),
    }
}

/// Raises the open-file limit to its hard limit: every transfer holds a
/// socket.
pub fn raise_nofile_limit() -> io::Result<u64> {
    let (_, hard) = getrlimit(Resource::RLIMIT_NOFILE).map_err(io::Error::from)?;
    setrlimit(Resource::RLIMIT_NOFILE, hard, hard).map_err(io::Error::from)?;
    Ok(hard)
}

/// Switches the whole process to `name` and its primary group, with no
/// supplementary groups and no capabilities, for good (real, effective and
/// saved IDs). Called before any shard thread exists (their rings exist,
/// disabled: no submission, no io-wq worker yet), so nothing keeps the old
/// IDs.
pub fn drop_privileges(name: &str) -> io::Result<()> {
    let user = User::from_name(name)
        .map_err(io::Error::from)?
        .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, format!("no user '{name}'")))?;
    if !user.uid.is_root() && ids_are(user.uid, user.gid)? {
        return Ok(()); // already exactly that user: nothing to give up
    }
    let fail = |what: &str, e: io::Error| {
        io::Error::new(
            e.kind(),
            format!("cannot switch to user '{name}' ({what}): {e}"),
        )
    };
    // Capabilities must not survive the switch (securebits may still keep
    // them: checked below).
    let _ = nix::sys::prctl::set_keepcaps(false);
    let nix_fail = |what: &'static str| move |e: nix::Error| fail(what, io::Error::from(e));
    nix::unistd::setgroups(&[user.gid]).map_err(nix_fail("setgroups"))?;
    nix::unistd::setresgid(user.gid, user.gid, user.gid).map_err(nix_fail("setresgid"))?;
    nix::unistd::setresuid(user.uid, user.uid, user.uid).map_err(nix_fail("setresuid"))?;
    if !ids_are(user.uid, user.gid)? {
        return Err(fail("check", io::Error::other("IDs did not all change")));
    }
    if !user.uid.is_root() {
        if holds_capabilities()? {
            return Err(fail("check", io::Error::other("capabilities were kept")));
        }
        if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
            return Err(fail("check", io::Error::other("root could be regained")));
        }
    }
    Ok(())
}

/// Whether the real, effective and saved user and group IDs are all these.
fn ids_are(uid: Uid, gid: Gid) -> io::Result<bool> {
    let u = nix::unistd::getresuid().map_err(io::Error::from)?;
    let g = nix::unistd::getresgid().map_err(io::Error::from)?;
    Ok([u.real, u.effective, u.saved].iter().all(|&x| x == uid)
        && [g.real, g.effective, g.saved].iter().all(|&x| x == gid))
}

/// Whether this thread has any permitted or effective capability.
fn holds_capabilities() -> io::Result<bool> {
    let status = std::fs::read_to_string("/proc/thread-self/status")?;
    Ok(status
        .lines()
        .filter_map(|l| {
            l.strip_prefix("CapPrm:")
                .or_else(|| l.strip_prefix("CapEff:"))
        })
        .any(|v| !v.trim().trim_start_matches('0').is_empty()))
}

/// A running server: its shards.
pub struct Server {
    shards: Vec<ShardHandle>,
    /// `--on-transfer`'s thread.
    hook: Option<Hook>,
    pub addresses: Vec<SocketAddr>,
    /// What `E` remap rules ask, kept for a reload's new rules.
    probe: Arc<NameProbe>,
    /// Every root's live mappings, and the counters by file, for `--metrics`.
    mapped: Vec<Arc<crate::files::MappedCounts>>,
    file_labels: Option<Arc<crate::metrics::FileLabels>>,
}

impl Server {
    /// Binds every address on every shard and starts the shards.
    pub fn start(config: &Config) -> io::Result<Server> {
        Server::start_on(config, Vec::new())
    }

    /// Starts the shards on `inherited` sockets (from inetd or systemd,
    /// shared by every shard), or if there are none on the addresses of
    /// the command line, bound anew by each shard.
    pub fn start_on(config: &Config, inherited: Vec<UdpSocket>) -> io::Result<Server> {
        let config = &*config.with_files().map_err(io::Error::other)?;
        // Checked by `Config::check` already; an index into `roots` below
        // must name the directory the path rules found the name in.
        if let Some(why) = config.directories_problem() {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, why));
        }
        // One confined root per directory (tftpd-hpa takes several).
        let mut roots = Vec::new();
        for directory in config.root_directories() {
            let root = FileRoot::open(&directory, config.permissive).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("cannot serve {}: {e}", directory.display()),
                )
            })?;
            roots.push(root);
        }
        let files = roots[0].clone();
        let more_files = roots[1..].to_vec();
        let mapped = roots.iter().map(FileRoot::mapped).collect();
        let file_labels = (config.metrics_file_labels > 0).then(|| {
            Arc::new(crate::metrics::FileLabels::new(usize::from(
                config.metrics_file_labels,
            )))
        });
        let rules = config.remap_rules().map_err(io::Error::other)?;
        let probe: Arc<NameProbe> = if roots.len() == 1 {
            let files = files.clone();
            Arc::new(move |name: &[u8], _write: bool| files.has_file(name))
        } else {
            // An `E` rule's name is looked for where the open would look.
            let paths = config.path_rules();
            Arc::new(
                move |name: &[u8], _write: bool| match paths.apply_rooted(name) {
                    Ok((index, rest)) => roots[index].has_file(&rest),
                    Err(_) => false,
                },
            )
        };
        let (hook, hook_sender) = match &config.on_transfer {
            Some(program) => {
                let (hook, sender) = Hook::spawn(program.clone(), config.root_directory())?;
                (Some(hook), Some(sender))
            }
            None => (None, None),
        };
        let cpus = allowed_cpus();
        let count = match config.threads {
            // Single-port routing needs each client's datagrams on one
            // shard: SO_REUSEPORT's hash gives that, a shared inherited
            // socket (every shard receiving from it) does not.
            _ if config.single_port && !inherited.is_empty() => 1,
            Some(n) => usize::from(n),
            None => cpus.len().max(1),
        };
        let settings = config.settings_with(count, config.policy(count, rules, probe.clone()));
        let mut addresses = if inherited.is_empty() {
            config.listen_addresses().map_err(io::Error::other)?
        } else {
            inherited
                .iter()
                .map(UdpSocket::local_addr)
                .collect::<io::Result<_>>()?
        };
        if inherited.is_empty() {
            for addr in &addresses {
                shard::net::check_port_free(*addr, config.ipv6).map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                })?;
            }
        }
        let mut prepared = Vec::with_capacity(count);
        for index in 0..count {
            let mut listeners = Vec::with_capacity(addresses.len());
            // Inherited sockets are one per address: every shard receives
            // from the same one (the kernel hands each datagram to one).
            for socket in &inherited {
                listeners.push(socket.try_clone()?);
            }
            for addr in addresses.iter_mut().filter(|_| inherited.is_empty()) {
                let bound = shard::net::bind_listener_family(*addr, config.rcvbuf, config.ipv6);
                let socket = bound.map_err(|e| {
                    io::Error::new(e.kind(), format!("cannot listen on {addr}: {e}"))
                })?;
                // With port 0 the first shard picks the port; the others
                // join it through SO_REUSEPORT.
                *addr = socket.local_addr()?;
                listeners.push(socket);
            }
            let shard_config = ShardConfig {
                index,
                cpu: (!cpus.is_empty()).then(|| cpus[index % cpus.len()]),
                listeners,
                endpoint: config.endpoint(count, settings.clone()),
                files: files.clone(),
                more_files: more_files.clone(),
                uploads: config.upload_rules(),
                log_transfers: !config.quiet,
                hook: hook_sender.clone(),
                shutdown_grace: Duration::from_secs(config.shutdown_grace),
                port_range: config.port_range,
                shards: count,
                file_labels: file_labels.clone(),
            };
            let shard = shard::prepare(shard_config)
                .map_err(|e| io::Error::new(e.kind(), format!("shard {index}: io_uring: {e}")))?;
            prepared.push(shard);
        }
        // Ports are bound, the root is open and the rings exist: nothing
        // after this needs root.
        if let Some(path) = &config.pidfile {
            std::fs::write(path, format!("{}\n", std::process::id())).map_err(|e| {
                io::Error::new(e.kind(), format!("cannot write {}: {e}", path.display()))
            })?;
        }
        if let Some(user) = &config.user {
            drop_privileges(user)?;
            let every = std::iter::once(&files).chain(&more_files);
            for (root, directory) in every.zip(config.root_directories()) {
                root.check_searchable().map_err(|e| {
                    io::Error::new(
                        e.kind(),
                        format!("cannot serve {} as user '{user}': {e}", directory.display()),
                    )
                })?;
            }
        }
        let mut shards = Vec::with_capacity(count);
        for (index, shard) in prepared.into_iter().enumerate() {
            let shard = shard
                .spawn()
                .map_err(|e| io::Error::new(e.kind(), format!("shard {index}: {e}")))?;
            shards.push(shard);
        }
        Ok(Server {
            shards,
            hook,
            addresses,
            probe,
            mapped,
            file_labels,
        })
    }

    /// Re-reads the files the command line names (`--map-file`,
    /// `--policy-file`) and gives every shard the new settings; transfers
    /// running keep theirs. A file that no longer parses changes nothing.
    pub fn reload(&self, config: &Config) -> Result<(), String> {
        let rules = config.remap_rules()?;
        let config = &*config.reread_policy_file()?;
        let settings = Arc::new(config.settings_with(
            self.shards.len(),
            config.policy(self.shards.len(), rules, self.probe.clone()),
        ));
        for shard in &self.shards {
            shard.send(Command::Settings(settings.clone()));
        }
        Ok(())
    }

    /// Requests seen and sessions live, summed over the shards.
    pub fn activity(&self) -> (u64, usize) {
        self.shards.iter().fold((0, 0), |(requests, live), shard| {
            let a = shard.activity();
            (
                requests + a.requests.load(Ordering::Relaxed),
                live + a.live.load(Ordering::Relaxed),
            )
        })
    }

    /// Each shard's loop turns so far; None for a shard whose thread ended.
    pub fn shard_turns(&self) -> Vec<Option<u64>> {
        self.shards
            .iter()
            .map(|shard| {
                shard
                    .is_running()
                    .then(|| shard.activity().turns.load(Ordering::Relaxed))
            })
            .collect()
    }

    /// Wakes every shard for one turn.
    pub fn poke(&self) {
        for shard in &self.shards {
            shard.poke();
        }
    }

    /// Every shard's published counters, for `--metrics`.
    pub fn published(&self) -> Vec<Arc<crate::metrics::Published>> {
        self.shards.iter().map(ShardHandle::published).collect()
    }

    /// Asks every shard to drain and stop.
    pub fn shut_down(&self) {
        for shard in &self.shards {
            shard.shut_down();
        }
    }

    /// Waits for every shard to stop; the first error wins.
    pub fn join(self) -> io::Result<()> {
        let mut result = Ok(());
        for shard in self.shards {
            if let Err(e) = shard.join() {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        if let Some(hook) = self.hook {
            let dropped = hook.dropped();
            match hook.finish(HOOK_FINISH) {
                Some(report) => tracing::info!(
                    runs = report.runs,
                    failed = report.failed,
                    dropped,
                    "on-transfer: {} run(s), {} failed, {dropped} record(s) dropped (queue full)",
                    report.runs,
                    report.failed
                ),
                None => tracing::warn!(
                    dropped,
                    "on-transfer: still running after {} s; not waited for ({dropped} record(s) dropped)",
                    HOOK_FINISH.as_secs()
                ),
            }
        }
        result
    }
}

/// What `run` woke up for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Wake {
    /// SIGINT or SIGTERM.
    Stop(Signal),
    /// A shard thread ended without being asked to (it queued SIGUSR1 with
    /// its index to this process).
    ShardDied(usize),
    /// SIGHUP: re-read the remap rules.
    Reload,
    /// The wait's timeout passed.
    Tick,
}

/// Waits for one of `signals` (blocked in every thread). A SIGUSR1 counts
/// as a shard's death only when this process queued it (`sigqueue` from a
/// shard thread); one sent from outside is ignored.
fn wait_wake(signals: &SigSet, timeout: Option<Duration>) -> io::Result<Wake> {
    loop {
        // SAFETY: siginfo_t is plain data; sigtimedwait fills it.
        let mut info: libc::siginfo_t = unsafe { std::mem::zeroed() };
        let rc = match timeout {
            // SAFETY: a valid set and a valid out-pointer.
            None => unsafe { libc::sigwaitinfo(signals.as_ref(), &mut info) },
            Some(timeout) => {
                let ts = libc::timespec {
                    tv_sec: timeout.as_secs() as libc::time_t,
                    tv_nsec: libc::c_long::from(timeout.subsec_nanos() as i32),
                };
                // SAFETY: a valid set, out-pointer and timespec.
                unsafe { libc::sigtimedwait(signals.as_ref(), &mut info, &ts) }
            }
        };
        if rc < 0 {
            let e = io::Error::last_os_error();
            match e.raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::EAGAIN) => return Ok(Wake::Tick),
                _ => return Err(e),
            }
        }
        match Signal::try_from(rc) {
            Ok(Signal::SIGUSR1) => {
                // SAFETY: for SI_QUEUE the kernel set si_pid and si_value.
                let (pid, value) = unsafe { (info.si_pid(), info.si_value()) };
                if info.si_code == libc::SI_QUEUE && pid == std::process::id() as libc::pid_t {
                    return Ok(Wake::ShardDied(value.sival_ptr as usize));
                }
                tracing::info!(pid, "SIGUSR1 from pid {pid} ignored");
            }
            Ok(Signal::SIGHUP) => return Ok(Wake::Reload),
            Ok(signal) => return Ok(Wake::Stop(signal)),
            Err(_) => {}
        }
    }
}

/// Forks: the parent waits until the child says it is serving (a byte on
/// a pipe, written once the ports are bound) and exits 0, or exits 1 if
/// the child ended first; the child leaves the terminal's session and
/// goes on, holding the pipe's write end.
fn detach() -> io::Result<std::os::fd::OwnedFd> {
    let (read, write) = nix::unistd::pipe().map_err(io::Error::from)?;
    // SAFETY: called first thing in `run`, before any thread is started,
    // so the child has the only thread and no lock is held mid-way.
    match unsafe { nix::unistd::fork() }.map_err(io::Error::from)? {
        nix::unistd::ForkResult::Parent { .. } => {
            drop(write);
            let mut byte = [0u8; 1];
            let ready = matches!(nix::unistd::read(&read, &mut byte), Ok(1));
            std::process::exit(if ready { 0 } else { 1 });
        }
        nix::unistd::ForkResult::Child => {
            drop(read);
            nix::unistd::setsid().map_err(io::Error::from)?;
            // Nothing is read or printed there, and a caller capturing
            // them must not wait for the daemon; stderr keeps the logs.
            let null = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open("/dev/null")?;
            nix::unistd::dup2_stdin(&null).map_err(io::Error::from)?;
            nix::unistd::dup2_stdout(&null).map_err(io::Error::from)?;
            Ok(write)
        }
    }
}

/// Runs the server until SIGINT or SIGTERM, then drains it. A second
/// signal exits at once. A shard that dies (a panic, its ring failing)
/// drains the others the same way and makes `run` fail, so the process
/// exits non-zero and a service manager can restart it.
pub fn run(config: &Config) -> io::Result<()> {
    // The policy file, read now (a reload reads it again).
    let config = &*config.with_files().map_err(io::Error::other)?;
    if let Some(input) = &config.map_test {
        return map_test(config, input);
    }
    // Started by a .socket unit: its sockets, as under --systemd.
    let activated;
    let config = if !config.systemd && systemd_passed_sockets() {
        activated = Config {
            systemd: true,
            ..config.clone()
        };
        &activated
    } else {
        config
    };
    // Taken before anything could write to inetd's socket on stdout.
    let inherited = inherited_sockets(config)?;
    // `-l` without `-L`: detach as tftpd-hpa does; the caller (an init
    // script, a Type=forking unit) returns once the ports are bound.
    let ready = if config.listen && !config.foreground && !config.systemd {
        Some(detach()?)
    } else {
        None
    };
    // Block the signals before any thread starts, so that every thread
    // inherits the mask and only `wait_wake` below receives them.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGINT);
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGUSR1);
    signals.add(Signal::SIGHUP);
    signals.thread_block().map_err(io::Error::from)?;
    // Detached or under inetd there is no terminal: syslog, as tftpd-hpa.
    let background = ready.is_some() || (!inherited.is_empty() && !config.systemd);
    let (target, format) = config.log_target(background);
    let quiet_stderr = ready.is_some() && target != log::Target::Stderr;
    log::configure(target, format, config.log_level())?;
    for warning in config.compat_warnings() {
        tracing::warn!("{warning}");
    }
    if let Err(e) = raise_nofile_limit() {
        tracing::warn!("cannot raise RLIMIT_NOFILE: {e}");
    }
    let idle_exit = config.idle_exit(!inherited.is_empty());
    // Bound before --user drops privileges, as the TFTP ports are.
    let metrics = config.metrics.map(Listening::bind).transpose()?;
    let server = Server::start_on(config, inherited)?;
    let exporter = Exporter::new(server.published(), &server.addresses)
        .with_files(server.mapped.clone(), server.file_labels.clone());
    if let Some(listening) = metrics {
        let addr = listening.addr;
        exporter.serve(listening)?;
        tracing::info!(%addr, "metrics on http://{addr}/metrics");
    }
    if let Some(ready) = ready {
        // The waiting parent exits 0 now; until this byte it would exit 1.
        let _ = nix::unistd::write(&ready, b"R");
        if quiet_stderr {
            // The logs go elsewhere: let go of the caller's stderr (a pipe
            // it may read to its end, as an init script's caller does).
            let null = std::fs::OpenOptions::new().write(true).open("/dev/null")?;
            nix::unistd::dup2_stderr(&null).map_err(io::Error::from)?;
        }
    }
    if Uid::effective().is_root() {
        tracing::warn!("running as root; --user USER drops to USER once bound");
    }
    let listening: Vec<String> = server.addresses.iter().map(|a| a.to_string()).collect();
    tracing::info!(
        "serving {} on {} with {} thread(s)",
        config
            .root_directories()
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(" "),
        listening.join(", "),
        server.shards.len()
    );
    tracing::info!("{}", config.effective());
    notify::ready(&format!(
        "serving {} on {}",
        config.directory.display(),
        listening.join(", ")
    ));
    let mut idle = IdleWatch::new(idle_exit);
    // systemd's watchdog, or for /readyz alone the same check of the
    // shards' turns every LIVENESS_EVERY.
    let mut watchdog = notify::Watchdog::from_env(server.shards.len());
    let pings = watchdog.is_some();
    if watchdog.is_none() && config.metrics.is_some() {
        watchdog = Some(notify::Watchdog::new(
            LIVENESS_EVERY * 2,
            server.shards.len(),
        ));
    }
    let mut watchdog_due = Instant::now();
    let wait_at_most = match (idle.poll_every(), watchdog.as_ref().map(|w| w.every())) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    };
    let died = loop {
        let wake = wait_wake(&signals, wait_at_most)?;
        if let Some(w) = &mut watchdog
            && Instant::now() >= watchdog_due
        {
            let alive = w.check(&server.shard_turns());
            if alive && pings {
                w.ping();
            }
            exporter.set_hung(!alive);
            server.poke();
            watchdog_due = Instant::now() + w.every();
        }
        match wake {
            Wake::Tick => {
                if idle.expired(Instant::now(), server.activity()) {
                    tracing::info!(
                        "idle for {} s (-t): exiting",
                        idle_exit.unwrap_or_default().as_secs()
                    );
                    break None;
                }
            }
            Wake::Stop(signal) => {
                notify::stopping(&format!("{signal}: finishing transfers"));
                tracing::info!(
                    "{signal}: finishing transfers (up to {} s)",
                    config.shutdown_grace
                );
                break None;
            }
            Wake::ShardDied(index) => {
                notify::stopping(&format!("shard {index} died"));
                tracing::error!(
                    "shard {index} died: stopping, finishing the other transfers (up to {} s)",
                    config.shutdown_grace
                );
                break Some(index);
            }
            Wake::Reload => {
                notify::reloading();
                log::reopen();
                let reloaded = server.reload(config);
                exporter.record_reload(reloaded.is_ok());
                match reloaded {
                    Ok(()) => tracing::info!("SIGHUP: reloaded"),
                    Err(e) => tracing::error!("SIGHUP: {e}; keeping the rules in force"),
                }
                notify::ready(&format!(
                    "serving {} on {}",
                    config.directory.display(),
                    listening.join(", ")
                ));
            }
        }
    };
    exporter.set_stopping();
    server.shut_down();
    std::thread::spawn(move || {
        // Another shard dying meanwhile changes nothing; a signal ends it.
        // (A SIGHUP now has nothing left to reload.)
        while let Ok(wake) = wait_wake(&signals, None) {
            if let Wake::Stop(_) = wake {
                tracing::info!("second signal: exiting now");
                log::flush(Duration::from_millis(200));
                std::process::exit(130);
            }
        }
    });
    let joined = server.join();
    if let Some(index) = died {
        let why = joined.err().map(|e| format!(": {e}")).unwrap_or_default();
        return Err(io::Error::other(format!("shard {index} died{why}")));
    }
    joined?;
    if let Some(path) = &config.pidfile
        && let Err(e) = std::fs::remove_file(path)
    {
        // As --user, the pidfile's directory may be out of reach.
        tracing::warn!("cannot remove {}: {e}", path.display());
    }
    tracing::info!("stopped");
    log::flush(LOG_FLUSH);
    Ok(())
}

/// How often the shards' turns are checked for `/readyz` without
/// systemd's watchdog.
const LIVENESS_EVERY: Duration = Duration::from_secs(5);

/// How long the `--on-transfer` program may take at exit for the records
/// still queued.
const HOOK_FINISH: Duration = Duration::from_secs(2);

/// How long the last lines may take to be written at exit.
const LOG_FLUSH: Duration = Duration::from_secs(1);

/// A failure that ends the process: on standard error, where whoever
/// started it looks, and in the log if that is elsewhere.
pub fn fatal(error: &io::Error) {
    if log::is_elsewhere() {
        tracing::error!("{error}");
    }
    // What was queued before (a shard's last words) comes out first.
    log::flush(LOG_FLUSH);
    eprintln!("ringtftpd: {error}");
}

/// `-t`: the server is idle once no request came and no transfer ran for
/// the whole limit.
struct IdleWatch {
    limit: Option<Duration>,
    requests: u64,
    since: Instant,
}

impl IdleWatch {
    fn new(limit: Option<Duration>) -> Self {
        IdleWatch {
            limit,
            requests: 0,
            since: Instant::now(),
        }
    }

    /// How often to look (None: never, without a limit).
    fn poll_every(&self) -> Option<Duration> {
        self.limit.map(|limit| limit.min(Duration::from_secs(1)))
    }

    /// Whether `activity` (requests so far, sessions live) shows the
    /// server idle past the limit by `now`.
    fn expired(&mut self, now: Instant, (requests, live): (u64, usize)) -> bool {
        let Some(limit) = self.limit else {
            return false;
        };
        if requests != self.requests || live > 0 {
            self.requests = requests;
            self.since = now;
            return false;
        }
        now.saturating_duration_since(self.since) >= limit
    }
}

/// The listening sockets handed over rather than bound: systemd's with
/// `--systemd`; or inetd's (and xinetd's, and a systemd `Accept=no`
/// socket's without `--systemd`) on standard input, when started without
/// `-l`/`-L`, as tftpd-hpa serves there. None otherwise: standalone.
/// systemd passed this process sockets (`LISTEN_PID` is ours and
/// `LISTEN_FDS` names at least one), as a .socket unit does.
fn systemd_passed_sockets() -> bool {
    let var = |name| std::env::var(name).ok().and_then(|v| v.parse::<u32>().ok());
    var("LISTEN_PID") == Some(std::process::id()) && var("LISTEN_FDS").is_some_and(|n| n > 0)
}

fn inherited_sockets(config: &Config) -> io::Result<Vec<UdpSocket>> {
    if config.systemd {
        let mut fds = listenfd::ListenFd::from_env();
        let mut sockets = Vec::with_capacity(fds.len());
        for index in 0..fds.len() {
            let socket = fds.take_udp_socket(index).map_err(|e| {
                io::Error::new(
                    e.kind(),
                    format!("--systemd: descriptor {}: {e}", index + 3),
                )
            })?;
            if let Some(socket) = socket {
                sockets.push(shard::net::adopt_listener(socket, config.rcvbuf)?);
            }
        }
        if sockets.is_empty() {
            return Err(io::Error::other(
                "--systemd: no sockets were passed (LISTEN_FDS); start it from a .socket unit",
            ));
        }
        return Ok(sockets);
    }
    if config.listen || config.foreground || !is_udp_socket(io::stdin().as_fd()) {
        return Ok(Vec::new());
    }
    let socket = UdpSocket::from(io::stdin().as_fd().try_clone_to_owned()?);
    // inetd makes the socket standard output and error too, where a log
    // line would fail: those go to /dev/null (tftpd-hpa logs to syslog).
    let null = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")?;
    nix::unistd::dup2_stdin(&null).map_err(io::Error::from)?;
    if is_socket(io::stdout().as_fd()) {
        nix::unistd::dup2_stdout(&null).map_err(io::Error::from)?;
    }
    if is_socket(io::stderr().as_fd()) {
        nix::unistd::dup2_stderr(&null).map_err(io::Error::from)?;
    }
    Ok(vec![shard::net::adopt_listener(socket, config.rcvbuf)?])
}

/// Whether `fd` is a socket (as inetd passes one on standard input).
pub fn is_socket(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    nix::sys::stat::fstat(fd).is_ok_and(|st| st.st_mode & libc::S_IFMT == libc::S_IFSOCK)
}

fn is_udp_socket(fd: std::os::fd::BorrowedFd<'_>) -> bool {
    is_socket(fd)
        && shard::net::get_int_opt(fd, libc::SOL_SOCKET, libc::SO_TYPE)
            .is_ok_and(|t| t == libc::SOCK_DGRAM)
}

/// `--map-test FILE`: prints what the remap rules make of each line of
/// FILE, as tftpd-hpa 7.x does, and serves nothing.
fn map_test(config: &Config, input: &Path) -> io::Result<()> {
    let rules = config.remap_rules().map_err(io::Error::other)?;
    let names = if input == Path::new("-") {
        let mut names = Vec::new();
        io::stdin().read_to_end(&mut names)?;
        names
    } else {
        std::fs::read(input)
            .map_err(|e| io::Error::new(e.kind(), format!("{}: {e}", input.display())))?
    };
    let context = RemapContext::new(remap::map_test_client(config.ipv6), config.create);
    let normalize = PathRules {
        normalize: config.normalize.unwrap_or_default(),
        ..PathRules::default()
    };
    let then = |name: Vec<u8>| match normalize.apply(&name) {
        Ok(normalized) => normalized.into_owned(),
        Err(_) => name,
    };
    // No rules: every name as it came (tftpd-hpa prints them so too).
    let rules = rules.unwrap_or_default();
    let output = rules.map_test_then(&names, &context, config.map_steps as usize, then);
    io::stdout().write_all(&output)
}
