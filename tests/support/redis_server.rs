//! A `redis-server` of a test's own on a free loopback port (feature `redis`).

use std::io::{BufRead, BufReader};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};

/// A `redis-server` of the test's own, stopped when dropped.
pub struct RedisServer {
    pub child: Option<Child>,
    pub port: u16,
    dir: std::path::PathBuf,
}

impl RedisServer {
    /// Starts one on a free port, or `None` when `redis-server` is missing and `CI` is
    /// not set.
    pub fn start() -> Option<Self> {
        let port = TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let dir = std::env::temp_dir().join(format!("towerguard-redis-{port}"));
        std::fs::create_dir_all(&dir).unwrap();
        let mut server = RedisServer {
            child: None,
            port,
            dir,
        };
        match server.spawn() {
            Ok(()) => Some(server),
            Err(error) if std::env::var_os("CI").is_none() => {
                eprintln!("skipped: cannot start redis-server ({error})");
                None
            }
            Err(error) => panic!("CI is set and redis-server cannot start: {error}"),
        }
    }

    /// Starts the server (again) on its port and returns once it accepts connections.
    pub fn spawn(&mut self) -> std::io::Result<()> {
        let mut child = Command::new("redis-server")
            .args(["--port", &self.port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no", "--daemonize", "no"])
            .arg("--dir")
            .arg(&self.dir)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()?;
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        for line in lines.by_ref() {
            if line?.contains("Ready to accept connections") {
                // Keep reading its log so it never blocks on a full pipe.
                std::thread::spawn(move || lines.for_each(drop));
                self.child = Some(child);
                return Ok(());
            }
        }
        let _ = child.kill();
        Err(std::io::Error::other(
            "redis-server exited before it was ready",
        ))
    }

    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
