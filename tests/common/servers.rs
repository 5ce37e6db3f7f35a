//! Real servers for the HTTP tests, on 127.0.0.1, each with its own configuration in a
//! temporary folder, stopped when dropped: nginx (static files, `PUT` through the dav
//! module) and the CNCF distribution registry (`docker-registry`).

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free TCP port on 127.0.0.1 (bound, then released for the server to take).
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// Waits (at most 10 s) until something accepts connections on `port`.
pub fn wait_for_port(port: u16, child: &mut Child, what: &str) {
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("{what} exited at start: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(10),
            "{what} did not listen on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// nginx serving `www()` read-only, `/up/` accepting `PUT` (dav), and `/auth/` only
/// with the header `X-Auth-Token: s3cret`. One process (`master_process off`).
pub struct Nginx {
    pub dir: tempfile::TempDir,
    pub port: u16,
    /// The HTTPS port, when started with a certificate.
    pub tls_port: Option<u16>,
    child: Child,
}

impl Nginx {
    pub fn start() -> Nginx {
        Self::start_with_tls(None)
    }

    /// Also serves `www()` over HTTPS with the PEM `(certificate chain, key)`.
    pub fn start_with_tls(tls: Option<(&Path, &Path)>) -> Nginx {
        let dir = tempfile::Builder::new()
            .prefix("imgconv-nginx-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        for sub in ["www/up", "www/auth", "logs", "tmp"] {
            std::fs::create_dir_all(d.join(sub)).unwrap();
        }
        // Workers may run as nobody when the tests run as root.
        for sub in ["www/up", "tmp"] {
            use std::os::unix::fs::PermissionsExt;
            std::fs::set_permissions(d.join(sub), std::fs::Permissions::from_mode(0o777)).unwrap();
        }
        let port = free_port();
        let tls_port = tls.map(|_| free_port());
        let tls_server = match (tls, tls_port) {
            (Some((cert, key)), Some(p)) => format!(
                "server {{ listen 127.0.0.1:{p} ssl; ssl_certificate {}; ssl_certificate_key {}; root {}/www; }}",
                cert.display(),
                key.display(),
                d.display()
            ),
            _ => String::new(),
        };
        let conf = format!(
            r#"
worker_processes 1;
master_process off;
daemon off;
pid {d}/nginx.pid;
error_log {d}/logs/error.log;
events {{ worker_connections 128; }}
http {{
  log_format bytes '$status $body_bytes_sent $request_length $request_method $uri';
  access_log {d}/logs/access.log bytes;
  client_body_temp_path {d}/tmp/body;
  proxy_temp_path {d}/tmp/proxy;
  fastcgi_temp_path {d}/tmp/fcgi;
  uwsgi_temp_path {d}/tmp/uwsgi;
  scgi_temp_path {d}/tmp/scgi;
  types {{ }}
  default_type application/octet-stream;
  server {{
    listen 127.0.0.1:{port};
    root {d}/www;
    location /up/ {{
      dav_methods PUT;
      create_full_put_path on;
      client_max_body_size 0;
    }}
    location /auth/ {{
      if ($http_x_auth_token != "s3cret") {{ return 401; }}
    }}
    location /moved/ {{
      rewrite ^/moved/(.*)$ /$1 redirect;
    }}
  }}
  {tls_server}
}}
"#,
            d = d.display()
        );
        std::fs::write(d.join("nginx.conf"), conf).unwrap();
        let mut child = Command::new("nginx")
            .arg("-c")
            .arg(d.join("nginx.conf"))
            .arg("-p")
            .arg(d)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("nginx is installed (.ci/run installs it)");
        wait_for_port(port, &mut child, "nginx");
        Nginx {
            dir,
            port,
            tls_port,
            child,
        }
    }

    /// The folder served at `/`.
    pub fn www(&self) -> PathBuf {
        self.dir.path().join("www")
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Body bytes sent for GET requests, from the access log.
    pub fn bytes_sent(&self) -> u64 {
        self.log()
            .iter()
            .filter(|l| l.get(3).is_some_and(|m| m == "GET"))
            .filter_map(|l| l.get(1)?.parse::<u64>().ok())
            .sum()
    }

    /// The access log: `[status, body bytes, request length, method, uri]` per request.
    pub fn log(&self) -> Vec<Vec<String>> {
        std::fs::read_to_string(self.dir.path().join("logs/access.log"))
            .unwrap_or_default()
            .lines()
            .map(|l| l.split_whitespace().map(str::to_string).collect())
            .collect()
    }

    /// Empties the access log.
    pub fn clear_log(&self) {
        std::fs::write(self.dir.path().join("logs/access.log"), "").unwrap();
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Copies `src` into nginx's folder as `name`.
pub fn publish(nginx: &Nginx, src: &Path, name: &str) -> String {
    let dst = nginx.www().join(name);
    std::fs::create_dir_all(dst.parent().unwrap()).unwrap();
    std::fs::copy(src, &dst).unwrap();
    nginx.url(name)
}

/// The CNCF distribution registry (`docker-registry`) on 127.0.0.1, storing in a
/// temporary folder; with `htpasswd = Some((user, password))` it wants basic auth.
pub struct Registry {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

impl Registry {
    pub fn start(htpasswd: Option<(&str, &str)>) -> Registry {
        let dir = tempfile::Builder::new()
            .prefix("imgconv-registry-")
            .tempdir()
            .unwrap();
        let d = dir.path();
        let port = free_port();
        let mut conf = format!(
            "version: 0.1\nlog:\n  level: error\nstorage:\n  filesystem:\n    rootdirectory: {}/data\nhttp:\n  addr: 127.0.0.1:{port}\n",
            d.display()
        );
        if let Some((user, pass)) = htpasswd {
            let o = Command::new("htpasswd")
                .args(["-Bbn", user, pass])
                .output()
                .expect("htpasswd is installed (apache2-utils)");
            assert!(o.status.success());
            std::fs::write(d.join("htpasswd"), &o.stdout).unwrap();
            conf.push_str(&format!(
                "auth:\n  htpasswd:\n    realm: test\n    path: {}/htpasswd\n",
                d.display()
            ));
        }
        std::fs::write(d.join("config.yml"), conf).unwrap();
        let mut child = Command::new("docker-registry")
            .arg("serve")
            .arg(d.join("config.yml"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("docker-registry is installed (.ci/run installs it)");
        wait_for_port(port, &mut child, "docker-registry");
        Registry { dir, port, child }
    }

    /// `docker://127.0.0.1:PORT/REPO`.
    pub fn url(&self, repo: &str) -> String {
        format!("docker://127.0.0.1:{}/{repo}", self.port)
    }

    /// Where the registry keeps the blob `sha256:HEX`.
    pub fn blob_file(&self, digest: &str) -> PathBuf {
        let hex = digest.trim_start_matches("sha256:");
        self.dir
            .path()
            .join("data/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
