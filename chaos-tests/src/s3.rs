//! A real S3-compatible server for tests and benchmarks: `moto_server`
//! (PyPI `moto[server]`, installed by `deploy/local/test.sh`) on loopback,
//! with the bucket `mailvault`.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A `moto_server` on loopback, stopped when dropped.
pub struct Moto {
    child: Child,
    /// Its `host:port`.
    pub addr: String,
}

impl Moto {
    /// Starts one on `127.0.0.1:port` and creates the bucket.
    pub fn start(port: u16) -> Moto {
        let addr = format!("127.0.0.1:{port}");
        let child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("moto_server not found: pip install 'moto[server]' (deploy/local/test.sh does)");
        let deadline = Instant::now() + Duration::from_secs(30);
        while std::net::TcpStream::connect(&addr).is_err() {
            assert!(Instant::now() < deadline, "moto_server did not start on {addr}");
            std::thread::sleep(Duration::from_millis(100));
        }
        let m = Moto { child, addr };
        m.http("PUT", "/mailvault");
        m
    }

    /// One plain HTTP/1.0 request; the answer's text.
    pub fn http(&self, method: &str, path: &str) -> String {
        use std::io::{Read, Write};
        let mut s = std::net::TcpStream::connect(&self.addr).unwrap();
        write!(
            s,
            "{method} {path} HTTP/1.0\r\nHost: {}\r\nContent-Length: 0\r\n\r\n",
            self.addr
        )
        .unwrap();
        let mut out = String::new();
        let _ = s.read_to_string(&mut out);
        out
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port free on 127.0.0.1 now.
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}
