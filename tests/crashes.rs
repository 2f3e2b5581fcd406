//! Crashes: the leftovers of a killed client.

mod common;

use common::cli::{People, run};

/// A client killed between writing a private file's temp copy and renaming it leaves
/// `NAME.tmp.PID` behind, holding a secret: the next `sfc` removes it, but never the temp
/// file of a client still running.
#[cfg(target_os = "linux")]
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_killed_clients_temp_files_are_removed() {
    let server = common::TestServer::start().await;
    let people = People::signed_up(&server, &["alice"]).await;
    let home = people.home("alice");

    let mut gone = tokio::process::Command::new("true").spawn().unwrap();
    let gone_pid = gone.id().unwrap();
    gone.wait().await.unwrap();
    let mut running = tokio::process::Command::new("sleep")
        .arg("30")
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let stale = home.join(format!("keystore.tmp.{gone_pid}"));
    let live = home.join(format!("keystore.tmp.{}", running.id().unwrap()));
    std::fs::write(&stale, b"a dead client's copy of the keys").unwrap();
    std::fs::write(&live, b"a running client's next keystore").unwrap();

    let out = run(people.sfc("alice", &["whoami"])).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        !stale.exists(),
        "the dead client's temp file is still there"
    );
    assert!(live.exists(), "the running client's temp file was removed");
    running.kill().await.unwrap();
    server.stop().await;
}
