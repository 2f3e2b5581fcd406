//! The promises `sfc` makes to the people who use it, through the built binary: nothing
//! lost (a killed `sfc recv`, two receivers on one home, a server that is down), and trust a
//! server cannot fake (safety numbers from the accepted key, verified contacts, an identity
//! that is not replaced by logging in elsewhere).

mod common;

use std::collections::BTreeMap;
use std::process::Stdio;
use std::time::Duration;

use common::TestServer;
use common::cli::{People, ServerProcess, assert_fails_with, run, stderr, stdout};

/// Lines of `sfc recv` output, counted.
fn count_lines(out: &str, counts: &mut BTreeMap<String, usize>) {
    for line in out.lines() {
        *counts.entry(line.to_owned()).or_default() += 1;
    }
}

/// `sfc recv` killed with SIGKILL at moments spread over its work, again and again, while
/// messages wait: every message is printed by some run (none lost), and a message printed
/// twice can only be one a run was killed right after printing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_receiver_killed_at_any_moment_loses_nothing() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    const MESSAGES: usize = 40;
    for n in 0..MESSAGES {
        let out = run(people.sfc("alice", &["send", "bob", &format!("m{n}")])).await;
        assert!(out.status.success(), "{out:?}");
    }
    let mut counts = BTreeMap::new();
    let mut killed = 0;
    for round in 0..60u64 {
        let mut recv = people.sfc("bob", &["recv", "--wait", "1"]);
        recv.stdout(Stdio::piped()).stderr(Stdio::piped());
        let child = recv.spawn().unwrap();
        let pid = child.id().unwrap();
        // From before the keys are loaded to the middle of the stream of messages.
        let delay = Duration::from_millis(40 + (round * 37) % 400);
        tokio::time::sleep(delay).await;
        let _ = std::process::Command::new("kill")
            .args(["-KILL", &pid.to_string()])
            .status();
        let out = tokio::time::timeout(Duration::from_secs(30), child.wait_with_output())
            .await
            .unwrap()
            .unwrap();
        if !out.status.success() {
            killed += 1;
        }
        count_lines(&stdout(&out), &mut counts);
        if (0..MESSAGES).all(|n| counts.contains_key(&format!("alice\tm{n}")))
            && out.status.success()
        {
            break;
        }
    }
    // A last, uninterrupted run takes whatever is left.
    let out = run(people.sfc("bob", &["recv", "--wait", "2"])).await;
    assert!(out.status.success(), "{out:?}");
    count_lines(&stdout(&out), &mut counts);
    let missing: Vec<usize> = (0..MESSAGES)
        .filter(|n| !counts.contains_key(&format!("alice\tm{n}")))
        .collect();
    let twice: usize = counts.values().filter(|&&c| c > 1).count();
    eprintln!(
        "{killed} runs killed, {} messages shown, {twice} of them twice",
        counts.len()
    );
    assert!(
        missing.is_empty(),
        "lost: {missing:?} ({killed} runs killed)"
    );
    assert!(
        twice <= killed,
        "{twice} messages shown twice with {killed} kills: {counts:?}"
    );
    // Nothing waits on the server any more.
    let out = run(people.sfc("bob", &["recv", "--wait", "1"])).await;
    assert_eq!(stdout(&out), "", "{out:?}");
    server.stop().await;
}

/// Two receivers on one home: the second refuses to start, clearly, and every message is
/// shown exactly once, in order, by the one that runs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_receiver_on_one_home_refuses_and_nothing_is_lost() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let mut shown = Vec::new();
    for round in 0..5 {
        for n in 0..4 {
            let text = format!("r{round}m{n}");
            let out = run(people.sfc("alice", &["send", "bob", &text])).await;
            assert!(out.status.success(), "{out:?}");
        }
        let (a, b) = tokio::join!(
            run(people.sfc("bob", &["recv", "--wait", "2"])),
            run(people.sfc("bob", &["recv", "--wait", "2"]))
        );
        let refused = [&a, &b]
            .iter()
            .filter(|o| !o.status.success())
            .map(|o| stderr(o))
            .collect::<Vec<_>>();
        assert!(refused.len() <= 1, "{a:?} {b:?}");
        for why in &refused {
            assert!(why.contains("already receiving"), "{why}");
        }
        for out in [&a, &b] {
            shown.extend(stdout(out).lines().map(str::to_owned));
        }
    }
    let expected: Vec<String> = (0..5)
        .flat_map(|r| (0..4).map(move |n| format!("alice\tr{r}m{n}")))
        .collect();
    assert_eq!(shown, expected);
    server.stop().await;
}

/// A send while the server is down is sealed into the outbox (exit 1, saying so) and goes
/// with the next `sfc outbox` once the server is back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_send_while_the_server_is_down_waits_in_the_outbox() {
    let server = TestServer::start().await;
    let mut people = People::signed_up(&server, &["alice", "bob", "carol"]).await;
    let out = run(people.sfc("alice", &["send", "bob", "before"])).await;
    assert!(out.status.success(), "{out:?}");
    let dir = server.stop().await;

    let out = run(people.sfc("alice", &["send", "bob", "while down"])).await;
    assert_fails_with(&out, "waits in the outbox");
    assert!(stderr(&out).contains("unreachable"), "{out:?}");
    // No session with carol: nothing can be sealed without the server, and nothing is kept.
    let out = run(people.sfc("alice", &["send", "carol", "hello"])).await;
    assert_fails_with(&out, "nothing was kept");

    let server = TestServer::start_in(dir, |_| {}).await;
    people.addr = server.addr.to_string();
    let out = run(people.sfc("alice", &["outbox"])).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(people.sfc("bob", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "alice\tbefore\nalice\twhile down\n");
    server.stop().await;
}

/// Logging in from a second home does not replace the account's identity unless asked; a
/// login refused in a home that holds another user's keys leaves its saved session alone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logging_in_elsewhere_keeps_the_identity_unless_asked() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let out = run(people.sfc("alice", &["send", "bob", "hi"])).await;
    assert!(out.status.success(), "{out:?}");
    let before = stdout(&run(people.sfc("alice", &["fingerprint", "bob"])).await);

    // Bob on a new laptop: refused, with the way out spelled out.
    let out = run(people.sfc("laptop", &["login", "bob"])).await;
    assert_fails_with(&out, "--new-identity");
    let out = run(people.sfc("laptop", &["whoami"])).await;
    assert_fails_with(&out, "not logged in");
    // The old home still works, and its conversation goes on.
    let out = run(people.sfc("bob", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "alice\thi\n");

    // Alice's home holds alice's keys: logging in there as bob fails and changes nothing.
    let out = run(people.sfc("alice", &["login", "bob"])).await;
    assert_fails_with(&out, "holds the keys of alice");
    let out = run(people.sfc("alice", &["whoami"])).await;
    assert_eq!(stdout(&out), "alice\n", "{out:?}");

    // Asked for: a new identity, which alice's client reports.
    let out = run(people.sfc("laptop", &["login", "--new-identity", "bob"])).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(people.sfc("laptop", &["send", "alice", "new laptop"])).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(people.sfc("alice", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "bob\tnew laptop\n");
    assert!(stderr(&out).contains("identity key has changed"), "{out:?}");
    let out = run(people.sfc("alice", &["fingerprint", "bob"])).await;
    assert_eq!(stdout(&out), before, "the number stays the accepted key's");
    assert!(stderr(&out).contains("ANOTHER identity key"), "{out:?}");
    server.stop().await;
}

/// A hostile server lists another identity key for a contact: the safety number does not
/// follow it, and `sfc fingerprint` says so loudly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_safety_number_comes_from_the_accepted_key_not_the_server() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let out = run(people.sfc("alice", &["send", "bob", "hi"])).await;
    assert!(out.status.success(), "{out:?}");
    let accepted = run(people.sfc("alice", &["fingerprint", "bob"])).await;
    assert!(accepted.status.success(), "{accepted:?}");
    assert!(!stderr(&accepted).contains("WARNING"), "{accepted:?}");

    // The server now lists a key of its own for bob (here: bob's account re-keyed from a
    // home alice's client never heard from; for alice's client it is the same thing).
    let out = run(people.sfc("mallory", &["login", "--new-identity", "bob"])).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(people.sfc("alice", &["fingerprint", "bob"])).await;
    assert_eq!(stdout(&out), stdout(&accepted));
    assert!(
        stderr(&out).contains("the server lists ANOTHER identity key"),
        "{out:?}"
    );
    server.stop().await;
}

/// A verified contact whose key changes: nothing is sealed for the new key until the user
/// accepts it. An unverified one: sealed, with the warning on every send until accepted.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_verified_contact_with_a_changed_key_is_blocked_until_trusted() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob", "carol"]).await;
    for (from, to) in [("alice", "bob"), ("alice", "carol")] {
        let out = run(people.sfc(from, &["send", to, "hi"])).await;
        assert!(out.status.success(), "{out:?}");
    }
    let out = run(people.sfc("alice", &["verify", "bob"])).await;
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).starts_with("bob verified: "), "{out:?}");

    // Both re-key; each writes to alice, which is how her client learns of it.
    for (name, home) in [("bob", "bob2"), ("carol", "carol2")] {
        let out = run(people.sfc(home, &["login", "--new-identity", name])).await;
        assert!(out.status.success(), "{out:?}");
        let out = run(people.sfc(home, &["send", "alice", "new keys"])).await;
        assert!(out.status.success(), "{out:?}");
    }
    let out = run(people.sfc("alice", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out).lines().count(), 2, "{out:?}");
    assert_eq!(stderr(&out).matches("identity key has changed").count(), 2);

    let out = run(people.sfc("alice", &["send", "bob", "secret"])).await;
    assert_fails_with(&out, "changed since you verified it");
    let out = run(people.sfc("alice", &["verify", "bob"])).await;
    assert_fails_with(&out, "in doubt");
    for _ in 0..2 {
        let out = run(people.sfc("alice", &["send", "carol", "hello?"])).await;
        assert!(out.status.success(), "{out:?}");
        assert!(stderr(&out).contains("sfc trust carol"), "{out:?}");
    }
    for name in ["bob", "carol"] {
        let out = run(people.sfc("alice", &["trust", name])).await;
        assert!(out.status.success(), "{out:?}");
        assert!(stdout(&out).contains("accepted"), "{out:?}");
    }
    let out = run(people.sfc("alice", &["send", "bob", "secret"])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stderr(&out), "", "no warning once accepted");
    let out = run(people.sfc("bob2", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "alice\tsecret\n", "{out:?}");
    server.stop().await;
}

/// Two users who write first at the same moment can go on talking: each reads the other's
/// first messages, and later ones in both directions.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simultaneous_first_messages_and_a_reset_lose_nothing() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let (a, b) = tokio::join!(
        run(people.sfc("alice", &["send", "bob", "hi bob"])),
        run(people.sfc("bob", &["send", "alice", "hi alice"]))
    );
    assert!(a.status.success() && b.status.success(), "{a:?} {b:?}");
    let out = run(people.sfc("bob", &["send", "alice", "still there?"])).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(people.sfc("alice", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "bob\thi alice\nbob\tstill there?\n");
    let out = run(people.sfc("bob", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "alice\thi bob\n");
    for round in 0..3 {
        let text = format!("a{round}");
        assert!(
            run(people.sfc("alice", &["send", "bob", &text]))
                .await
                .status
                .success()
        );
        let text = format!("b{round}");
        assert!(
            run(people.sfc("bob", &["send", "alice", &text]))
                .await
                .status
                .success()
        );
    }
    let out = run(people.sfc("alice", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "bob\tb0\nbob\tb1\nbob\tb2\n");
    let out = run(people.sfc("bob", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "alice\ta0\nalice\ta1\nalice\ta2\n");

    // A reset by hand starts a new session; the conversation goes on.
    let out = run(people.sfc("alice", &["reset", "bob"])).await;
    assert!(out.status.success(), "{out:?}");
    assert!(
        run(people.sfc("alice", &["send", "bob", "fresh"]))
            .await
            .status
            .success()
    );
    assert!(
        run(people.sfc("bob", &["send", "alice", "ok"]))
            .await
            .status
            .success()
    );
    let out = run(people.sfc("bob", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "alice\tfresh\n");
    let out = run(people.sfc("alice", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "bob\tok\n");
    server.stop().await;
}

/// Sending to oneself is refused with a clear error, before anything is sealed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sending_to_oneself_is_refused() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice"]).await;
    let out = run(people.sfc("alice", &["send", "Alice", "note to self"])).await;
    assert_fails_with(&out, "cannot send a message to yourself");
    let out = run(people.sfc("alice", &["outbox"])).await;
    assert!(out.status.success() && stdout(&out).is_empty(), "{out:?}");
    server.stop().await;
}

/// `sfc recv --wait` outlives a server restart: it says the connection was lost, reconnects
/// with the saved session, and shows what arrives afterwards.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_receiver_reconnects_after_a_server_restart() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let mut recv = people.sfc("bob", &["recv", "--wait", "30", "--count", "2"]);
    recv.stdout(Stdio::piped()).stderr(Stdio::piped());
    let recv = recv.spawn().unwrap();
    let out = run(people.sfc("alice", &["send", "bob", "before"])).await;
    assert!(out.status.success(), "{out:?}");
    tokio::time::sleep(Duration::from_millis(500)).await;
    let addr = server.addr;
    let dir = server.stop().await;
    let server = TestServer::start_at(addr, dir, |_| {}).await;
    let out = run(people.sfc("alice", &["send", "bob", "after"])).await;
    assert!(out.status.success(), "{out:?}");
    let out = tokio::time::timeout(Duration::from_secs(30), recv.wait_with_output())
        .await
        .expect("recv ends after two messages")
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "alice\tbefore\nalice\tafter\n");
    let err = stderr(&out);
    assert!(
        err.contains("connection lost") && err.contains("reconnected"),
        "{err}"
    );
    server.stop().await;
}

/// The server is killed (`kill -9`: nothing is closed) and restarted on the same data and
/// port while `sfc recv --wait` waits with nothing to send: its idle ping finds the connection
/// dead, it reconnects, and shows what was sent after the restart.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_waiting_receiver_survives_a_killed_server() {
    let dir = tempfile::tempdir().unwrap();
    let server = ServerProcess::start(dir.path()).await;
    let addr = server.addr.clone();
    let ca = dir.path().join("certs").join("ca.crt");
    let people = People::signed_up_at(&addr, &ca, &["alice", "bob"]).await;
    let out = run(people.sfc("alice", &["send", "bob", "before"])).await;
    assert!(out.status.success(), "{out:?}");
    let mut recv = people.sfc("bob", &["recv", "--wait", "40", "--count", "2"]);
    recv.stdout(Stdio::piped()).stderr(Stdio::piped());
    let recv = recv.spawn().unwrap();
    tokio::time::sleep(Duration::from_secs(1)).await;
    server.kill().await;
    let server = ServerProcess::start_on(dir.path(), &addr).await;
    let out = run(people.sfc("alice", &["send", "bob", "after"])).await;
    assert!(out.status.success(), "{out:?}");
    let started = std::time::Instant::now();
    let out = tokio::time::timeout(Duration::from_secs(40), recv.wait_with_output())
        .await
        .expect("recv ends after two messages")
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "alice\tbefore\nalice\tafter\n");
    assert!(stderr(&out).contains("reconnected"), "{out:?}");
    // The idle ping comes within 10 s of the last traffic.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "{:?}",
        started.elapsed()
    );
    server.terminate().await;
}

/// A message that cannot be opened (alice's home restored from an older copy): `sfc recv`
/// says so and keeps it, `sfc quarantine` lists it, bob's client sends it again when it
/// hears of it, and alice reads it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_that_cannot_be_opened_is_quarantined_and_comes_again() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    let turn = |from: &'static str, to: &'static str, text: &'static str| {
        let people = &people;
        async move {
            let out = run(people.sfc(from, &["send", to, text])).await;
            assert!(out.status.success(), "{out:?}");
            let out = run(people.sfc(to, &["recv", "--count", "1", "--wait", "5"])).await;
            assert_eq!(stdout(&out), format!("{from}\t{text}\n"));
        }
    };
    turn("bob", "alice", "one").await;
    let keystore = people.home("alice").join("keystore.msgpack");
    let backup = std::fs::read(&keystore).unwrap();
    turn("alice", "bob", "two").await;
    turn("bob", "alice", "three").await;
    turn("alice", "bob", "four").await;
    std::fs::write(&keystore, backup).unwrap();

    let out = run(people.sfc("bob", &["send", "alice", "five"])).await;
    let id = stdout(&out).trim().to_owned();
    let out = run(people.sfc("alice", &["recv", "--wait", "2"])).await;
    assert_eq!(stdout(&out), "", "{out:?}");
    assert!(stderr(&out).contains("could not be opened"), "{out:?}");
    let out = run(people.sfc("alice", &["quarantine"])).await;
    assert!(stdout(&out).starts_with(&format!("bob\t{id}\t")), "{out:?}");

    let out = run(people.sfc("bob", &["recv", "--wait", "2"])).await;
    assert!(
        stderr(&out).contains(&format!("alice could not open {id}: sent again as")),
        "{out:?}"
    );
    let out = run(people.sfc("alice", &["recv", "--count", "1", "--wait", "5"])).await;
    assert_eq!(stdout(&out), "bob\tfive\n", "{out:?}");
    let out = run(people.sfc("alice", &["quarantine", "--clear"])).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(people.sfc("alice", &["quarantine"])).await;
    assert_eq!(stdout(&out), "");
    turn("alice", "bob", "six").await;
    server.stop().await;
}
