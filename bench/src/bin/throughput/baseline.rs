//! The source file, the warm-up before each row, and the two baselines our rows are
//! compared with: (a) `sendfile` to a reader writing a file, (c) plain quinn on one stream.

use crate::measure::{threads_cpu, Sample};
use crate::ours::quic_config;
use anyhow::{bail, Context, Result};
use damselfly_bench::cpu_seconds;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

pub(crate) fn make_file(dir: &Path, size: u64) -> Result<std::fs::File> {
    let path = dir.join("source.bin");
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)?;
    let mut block = vec![0u8; 1 << 20];
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut off = 0;
    while off < size {
        for chunk in block.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let b = x.to_le_bytes();
            chunk.copy_from_slice(&b[..chunk.len()]);
        }
        let n = (size - off).min(block.len() as u64) as usize;
        f.write_all_at(&block[..n], off)?;
        off += n as u64;
    }
    // Written back before any measurement: otherwise the kernel's writeback of this setup
    // data runs during the first rows and steals CPU and disk from them.
    f.sync_all()?;
    Ok(f)
}

/// Writes `size` bytes to a scratch file in `dir` and deletes it, right before a row, so that
/// the row's receiver writes into memory the guest has just had in use. On a VM whose balloon
/// does free page reporting (this one: tuning.md), memory freed a few seconds earlier (the
/// previous row's files) is handed back to the host, and the first run after that spends
/// 2–3 CPU s per GiB faulting it back in, whichever transport it measures. Every row, the
/// baseline included, gets the same warm-up; it is not timed.
pub(crate) fn warm_up(dir: &Path, size: u64, enabled: bool) -> Result<()> {
    if !enabled {
        return Ok(());
    }
    let path = dir.join("warm-up.tmp");
    let f = std::fs::File::create(&path)?;
    let block = vec![0x5au8; 1 << 20];
    let mut off = 0u64;
    while off < size {
        let n = (size - off).min(block.len() as u64) as usize;
        f.write_all_at(&block[..n], off)?;
        off += n as u64;
    }
    drop(f);
    std::fs::remove_file(&path)?;
    Ok(())
}

/// (a) sendfile from the file to a socket; the receiver writes what it reads into a file.
pub(crate) fn sendfile_baseline(src: &std::fs::File, size: u64, out: &Path) -> Result<Sample> {
    let l = TcpListener::bind("127.0.0.1:0")?;
    let addr = l.local_addr()?;
    let src = src.try_clone()?;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    let sender = std::thread::spawn(move || -> Result<()> {
        let (s, _) = l.accept()?;
        let mut off = 0u64;
        while off < size {
            let n = dataplane::sys::sendfile(
                s.as_raw_fd(),
                &src,
                off,
                (size - off).min(1 << 30) as usize,
            )?;
            if n == 0 {
                bail!("source file ended early");
            }
            off += n as u64;
        }
        Ok(())
    });
    let me: Vec<u32> = dataplane::runtime::current_tid().into_iter().collect();
    let recv0 = threads_cpu(&me);
    let mut c = TcpStream::connect(addr)?;
    let f = std::fs::File::create(out)?;
    let mut buf = vec![0u8; 1 << 20];
    let mut got = 0u64;
    while got < size {
        let n = c.read(&mut buf)?;
        if n == 0 {
            bail!("baseline sender closed early at {got}");
        }
        f.write_all_at(&buf[..n], got)?;
        got += n as u64;
    }
    let recv_cpu = threads_cpu(&me) - recv0;
    sender
        .join()
        .map_err(|_| anyhow::anyhow!("sender panicked"))??;
    eprintln!("[throughput]   baseline receiver CPU s: {recv_cpu:.2}");
    Ok(Sample {
        secs: t0.elapsed().as_secs_f64(),
        bytes: size,
        cpu_secs: cpu_seconds() - cpu0,
        serve_cpu_secs: 0.0,
    })
}

/// (c) plain quinn: the file sent on one stream in 1 MiB chunks read from the page cache;
/// the receiver writes what it reads into a file. Same TLS and transport settings as our
/// QUIC data plane; each side on its own one-thread tokio runtime.
pub(crate) fn plain_quinn(
    src: &std::fs::File,
    size: u64,
    out: &Path,
    payload: Option<u16>,
    quinn_defaults: bool,
    discard: bool,
) -> Result<Sample> {
    let qcfg = quic_config(payload);
    let (mut ep_cfg, mut server_cfg, mut client_cfg) = dataplane::quic::configs(&qcfg)?;
    if quinn_defaults {
        let t = Arc::new(quinn::TransportConfig::default());
        server_cfg.transport_config(t.clone());
        client_cfg.transport_config(t);
        ep_cfg = quinn::EndpointConfig::default();
    }
    let server_rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let server = {
        let _g = server_rt.enter();
        quinn::Endpoint::new(
            ep_cfg.clone(),
            Some(server_cfg),
            dataplane::quic::bind_udp(&qcfg)?,
            Arc::new(quinn::TokioRuntime),
        )?
    };
    let addr = server.local_addr()?;
    let src = src.try_clone()?;
    let sender = server_rt.spawn(async move {
        let conn = server.accept().await.context("no connection")?.await?;
        let (mut send, mut recv) = conn.accept_bi().await?;
        let mut go = [0u8; 1];
        recv.read_exact(&mut go).await?;
        let mut off = 0u64;
        while off < size {
            let n = (size - off).min(1 << 20) as usize;
            let mut b = bytes::BytesMut::zeroed(n);
            src.read_exact_at(&mut b, off)?;
            send.write_chunk(b.freeze()).await?;
            off += n as u64;
        }
        send.finish()?;
        let _ = send.stopped().await;
        let st = conn.stats();
        eprintln!(
            "[throughput] (c) sender view: tx datagrams {} ios {}, {:?}",
            st.udp_tx.datagrams, st.udp_tx.ios, st.path
        );
        anyhow::Ok(())
    });
    let client_rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let f = std::fs::File::create(out)?;
    let cpu0 = cpu_seconds();
    let t0 = Instant::now();
    client_rt.block_on(async {
        let mut client = quinn::Endpoint::new(
            ep_cfg,
            None,
            dataplane::quic::bind_udp(&qcfg)?,
            Arc::new(quinn::TokioRuntime),
        )?;
        client.set_default_client_config(client_cfg);
        let conn = client.connect(addr, "damselfly")?.await?;
        let (mut send, mut recv) = conn.open_bi().await?;
        send.write_all(&[1]).await?;
        let mut got = 0u64;
        while let Some(chunk) = recv.read_chunk(1 << 20, true).await? {
            if !discard {
                f.write_all_at(&chunk.bytes, got)?;
            }
            got += chunk.bytes.len() as u64;
        }
        if got != size {
            bail!("plain quinn received {got} of {size} bytes");
        }
        let st = conn.stats();
        eprintln!(
            "[throughput] (c) client view: rtt {:?}, mtu {}, rx datagrams {}, tx datagrams {}, path {:?}",
            st.path.rtt, st.path.current_mtu, st.udp_rx.datagrams, st.udp_tx.datagrams, st.path
        );
        conn.close(0u32.into(), b"done");
        anyhow::Ok(())
    })?;
    let secs = t0.elapsed().as_secs_f64();
    server_rt
        .block_on(sender)
        .map_err(|e| anyhow::anyhow!("sender task: {e}"))??;
    Ok(Sample {
        secs,
        bytes: size,
        cpu_secs: cpu_seconds() - cpu0,
        serve_cpu_secs: 0.0,
    })
}
