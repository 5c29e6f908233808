//! Nginx in the gateway phase: the bench's own Nginxes in front of the demo upstream
//! (scripts/bench/proxy-nginx.conf straight to it, peer-nginx.conf running an in-Nginx
//! Lua limiter), the upstream's counts, and the check that every answer through any of
//! them was a 200 the upstream counted.

use std::fs;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result, bail};

use crate::probe::{self, port_open};
use crate::process::{Records, Started, tail, wait_until};
use crate::{LOOPBACK, say};

/// Ports tried for the bench's own Nginx.
const PROXY_PORTS: std::ops::RangeInclusive<u16> = 8090..=8099;

/// The files the in-Nginx Lua peer needs in the folder `PEER_LUA` names.
const PEER_FILES: [&str; 2] = ["resty/redis.lua", "resty/redis/ratelimit.lua"];
/// The Nginx modules it runs on (Debian's libnginx-mod-http-lua).
const LUA_MODULE: &str = "/usr/lib/nginx/modules/ngx_http_lua_module.so";

/// The folder `PEER_LUA` names, when it and the Lua module hold what the peer needs; else
/// why the peer is skipped.
pub fn peer_lua() -> Result<std::path::PathBuf, String> {
    let folder = std::env::var("PEER_LUA").ok().filter(|f| !f.is_empty());
    let folder = folder.ok_or("PEER_LUA is not set")?;
    let folder = Path::new(&folder).canonicalize();
    let folder = folder.map_err(|err| format!("PEER_LUA: {err}"))?;
    let missing = PEER_FILES.iter().find(|file| !folder.join(file).is_file());
    if let Some(file) = missing {
        return Err(format!("PEER_LUA={}: no {file}", folder.display()));
    }
    if !Path::new(LUA_MODULE).is_file() {
        return Err(format!("no {LUA_MODULE} (Debian: libnginx-mod-http-lua)"));
    }
    Ok(folder)
}

/// Starts one of the bench's Nginxes (`name`: `proxy-nginx` or `peer-nginx`, from
/// scripts/bench/NAME.conf) on the first free port of [`PROXY_PORTS`], its config, pid,
/// logs and temp files in `out`/NAME, in front of the demo upstream on `upstream`, with
/// `more` replaced in its template; returns it, its port and the command.
pub fn bench_nginx_up(
    (root, out, own): (&Path, &Path, &Records),
    name: &str,
    upstream: u16,
    more: &[(&str, String)],
) -> Result<(Started, u16, String)> {
    let port = PROXY_PORTS.clone().find(|&p| !port_open(p));
    let port = port.context("no free port in 8090-8099 for the bench's Nginx")?;
    let dir = out.join(name);
    fs::create_dir_all(dir.join("logs"))?;
    fs::create_dir_all(dir.join("temp"))?;
    let template = fs::read_to_string(root.join(format!("scripts/bench/{name}.conf")))?;
    let (upstream, folder) = (format!("{LOOPBACK}:{upstream}"), dir.display().to_string());
    let mut config = template
        .replace("@DIR@", &folder)
        .replace("@UPSTREAM@", &upstream)
        .replace("@PORT@", &port.to_string());
    for (marker, value) in more {
        config = config.replace(marker, value);
    }
    fs::write(dir.join("nginx.conf"), config)?;
    let error_log = dir.join("logs/error.log");
    let errors = error_log.display();
    let args = format!("-e {errors} -p {folder}/ -c {folder}/nginx.conf");
    let mut nginx = Command::new("nginx");
    let nginx = nginx.args(args.split(' '));
    let mut nginx = Started::spawn(own, name, nginx, &dir.join("nginx.log"))?;
    let listening = format!("the bench's {name} listens on {port}");
    let up = || port_open(port) || !nginx.running();
    wait_until(&listening, Duration::from_secs(10), up)?;
    if !nginx.running() {
        bail!("the bench's {name} exited: {}", tail(&error_log, 5));
    }
    let pid = nginx.pid();
    say!("phase gateway: the bench's {name} (pid {pid}) on {port}, in front of {upstream}");
    Ok((nginx, port, format!("nginx {args} &")))
}

/// What the demo upstream (its counts on `port`) counted for `path` so far.
pub fn upstream_count(port: u16, path: &str) -> Result<u64> {
    let counts = probe::json(port, "/__upstream/count")?;
    Ok(counts["paths"][path].as_u64().unwrap_or(0))
}

/// Whether the answers through the gateway are what its phase needs: some 200s, no 429
/// (the policy admits everything), and the demo upstream counted each 200 (and at most
/// the requests abandoned or failed besides). An error says what is wrong; `Ok(Some)`
/// what is odd but leaves the figures standing.
pub fn check_admitted(
    [ok, denied, other]: [u64; 3],
    closed: u64,
    upstream: u64,
) -> Result<Option<String>, String> {
    let wrong = if ok == 0 {
        "no request was answered 200".into()
    } else if denied > 0 {
        format!("{denied} requests were denied (429): the policy should admit every request")
    } else if upstream < ok {
        format!("the demo upstream counted {upstream} requests, fewer than the {ok} answered 200")
    } else if upstream > ok + closed + other || other > 0 {
        let failed = closed + other;
        return Ok(Some(format!(
            "{other} answers other than 200/429 (or socket errors); the demo upstream counted {upstream} requests for {ok} answered 200 and {failed} abandoned or failed"
        )));
    } else {
        return Ok(None);
    };
    Err(wrong)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gateway_answers_must_be_admitted_and_counted() {
        assert_eq!(check_admitted([1000, 0, 0], 3, 1002), Ok(None));
        let wrong = |statuses, upstream| check_admitted(statuses, 0, upstream).unwrap_err();
        assert!(wrong([0, 0, 5], 0).contains("no request was answered 200"));
        assert!(wrong([1000, 1, 0], 1000).contains("429"));
        assert!(wrong([1000, 0, 0], 999).contains("fewer"));
        let odd = check_admitted([1000, 0, 2], 0, 1010).unwrap().unwrap();
        assert!(odd.starts_with("2 answers other than 200/429"), "{odd}");
    }
}
