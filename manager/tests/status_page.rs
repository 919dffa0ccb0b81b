//! The status page renders in headless Chromium (Debian's `chromium`) and shows the live
//! schedulers. Skips when Chromium is not installed (fails instead with `DAMSELFLY_STRICT=1`).
#![allow(clippy::unwrap_used)]

mod common;

use common::{grpc, manager};
use damselfly_manager::proto;

fn chromium() -> Option<&'static str> {
    ["chromium", "chromium-browser", "google-chrome"]
        .into_iter()
        .find(|exe| {
            std::process::Command::new(exe)
                .arg("--version")
                .output()
                .is_ok_and(|o| o.status.success())
        })
}

#[tokio::test]
async fn status_page_renders_in_headless_chromium() {
    let Some(exe) = chromium() else {
        needs::skip(
            "status_page_renders_in_headless_chromium",
            "no chromium (apt-get install -y chromium)",
        );
        return;
    };
    needs::found("status_page_renders_in_headless_chromium");
    let (m, dir) = manager(|_| {}).await;
    let mut client = grpc(&m).await;
    client
        .register_scheduler(proto::RegisterSchedulerRequest {
            hostname: "sched-visible".into(),
            ip: "127.0.0.1".into(),
            port: 8002,
            ..Default::default()
        })
        .await
        .unwrap();
    let url = format!("http://{}/", m.rest_addr);
    let profile = dir.path().join("chromium-profile");
    let shot = dir.path().join("status.png");
    let out = tokio::process::Command::new(exe)
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-dev-shm-usage",
            "--no-first-run",
            &format!("--user-data-dir={}", profile.display()),
            &format!("--screenshot={}", shot.display()),
            "--window-size=1200,800",
            "--dump-dom",
            &url,
        ])
        .kill_on_drop(true)
        .output();
    let out = tokio::time::timeout(std::time::Duration::from_secs(120), out)
        .await
        .expect("chromium finished")
        .unwrap();
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains("<h1>Damselfly manager</h1>"),
        "chromium rendered the page: {}\n{}",
        dom,
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(dom.contains("sched-visible"));
    assert!(dom.contains("class=\"active\">active</td>"));
    if let Ok(keep) = std::env::var("DAMSELFLY_STATUS_SCREENSHOT") {
        let _ = std::fs::copy(&shot, keep);
    }
    m.shutdown().await.unwrap();
}
