//! Devices through the built `sfc` binary against an in-process server: linking a second home
//! with `sfc device link` and `sfc device add` running at once, the device list on both, a
//! wrong code refused on both sides, removal seen by the removed home, logging in as the
//! home's device, a fresh home pointed to linking, an identity replaced on purpose, and a
//! linked device joining the account's groups (and leaving them when removed).

mod common;

use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use common::TestServer;
use common::cli::{People, assert_fails_with, run, stderr, stdout};
use tokio::io::{AsyncBufReadExt, AsyncReadExt, BufReader, Lines};
use tokio::process::{Child, ChildStdout};

/// `sfc device link` running in `name`'s home, its code read from its output.
struct Linking {
    child: Child,
    lines: Lines<BufReader<ChildStdout>>,
    seen: String,
    code: String,
}

impl Linking {
    async fn start(people: &People, name: &str) -> Self {
        let mut command = people.sfc(name, &["device", "link"]);
        command.stdout(Stdio::piped()).stderr(Stdio::piped());
        let mut child = command.spawn().unwrap();
        let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
        let mut seen = String::new();
        // Up to the line that says it waits: the code comes before it.
        let code = tokio::time::timeout(Duration::from_secs(15), async {
            let mut code = None;
            loop {
                let line = lines.next_line().await.unwrap();
                let line = line.unwrap_or_else(|| panic!("no code in {seen:?}"));
                seen.push_str(&line);
                seen.push('\n');
                if let Some(shown) = line.strip_prefix("link code: ") {
                    code = Some(shown.to_owned());
                }
                if line.starts_with("waiting") {
                    return code.unwrap_or_else(|| panic!("no code in {seen:?}"));
                }
            }
        })
        .await
        .unwrap();
        Self {
            child,
            lines,
            seen,
            code,
        }
    }

    /// Waits for `sfc device link` to end; its status, whole standard output and standard
    /// error.
    async fn finish(mut self) -> (ExitStatus, String, String) {
        tokio::time::timeout(Duration::from_secs(30), async {
            while let Some(line) = self.lines.next_line().await.unwrap() {
                self.seen.push_str(&line);
                self.seen.push('\n');
            }
            let mut errors = String::new();
            if let Some(mut stream) = self.child.stderr.take() {
                stream.read_to_string(&mut errors).await.unwrap();
            }
            let status = self.child.wait().await.unwrap();
            (status, self.seen, errors)
        })
        .await
        .unwrap()
    }
}

/// Links `new_home` to `user`'s account from `existing`'s home, as a person would: the code
/// shown by one `sfc` typed into the other while the first waits.
async fn link(people: &People, existing: &str, user: &str, new_home: &str, name: &str) -> String {
    let linking = Linking::start(people, existing).await;
    assert!(
        linking
            .seen
            .contains(&format!("sfc device add {user} {}", linking.code)),
        "{:?}",
        linking.seen
    );
    assert!(linking.seen.contains("5 minutes"), "{:?}", linking.seen);
    let code = linking.code.clone();
    let added = run(people.sfc(new_home, &["device", "add", user, &code, "--name", name])).await;
    assert!(added.status.success(), "{added:?}");
    let (status, out, err) = linking.finish().await;
    assert!(status.success(), "{out} {err}");
    stdout(&added)
}

/// The lines of `sfc devices` in `home`.
async fn devices(people: &People, home: &str) -> Vec<String> {
    let out = run(people.sfc(home, &["devices"])).await;
    assert!(out.status.success(), "{out:?}");
    stdout(&out).lines().map(str::to_owned).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_home_has_the_identity_and_contacts_lists_devices_and_logs_in_as_itself() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    // Bob's first home pins alice's key.
    let out = run(people.sfc("alice", &["send", "bob", "hi"])).await;
    assert!(out.status.success(), "{out:?}");
    let out = run(people.sfc("bob", &["recv"])).await;
    assert_eq!(stdout(&out), "alice\thi\n");
    let number = stdout(&run(people.sfc("bob", &["fingerprint", "alice"])).await);

    let added = link(&people, "bob", "bob", "laptop", "laptop").await;
    assert!(added.contains("as device 2: laptop"), "{added:?}");
    assert!(added.contains("the keys of 1 pinned contact"), "{added:?}");

    // Both homes list both devices, each marking itself.
    let on_phone = devices(&people, "bob").await;
    assert_eq!(on_phone.len(), 2, "{on_phone:?}");
    assert!(
        on_phone[0].starts_with("1\tfirst device\tadded "),
        "{on_phone:?}"
    );
    assert!(on_phone[0].ends_with("\tthis device"), "{on_phone:?}");
    assert!(on_phone[1].starts_with("2\tlaptop\tadded "), "{on_phone:?}");
    assert!(!on_phone[1].contains("this device"), "{on_phone:?}");
    let on_laptop = devices(&people, "laptop").await;
    assert_eq!(on_laptop.len(), 2, "{on_laptop:?}");
    assert!(on_laptop[1].ends_with("\tthis device"), "{on_laptop:?}");
    assert!(!on_laptop[0].contains("this device"), "{on_laptop:?}");

    // The laptop holds bob's identity and alice's pinned key: the same safety number.
    let out = run(people.sfc("laptop", &["whoami"])).await;
    assert_eq!(stdout(&out), "bob\n", "{out:?}");
    let out = run(people.sfc("laptop", &["fingerprint", "alice"])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), number);
    assert!(!stderr(&out).contains("WARNING"), "{out:?}");

    // Logged out and in again, the laptop is device 2 still.
    assert!(
        run(people.sfc("laptop", &["logout"]))
            .await
            .status
            .success()
    );
    let out = run(people.sfc("laptop", &["login", "bob"])).await;
    assert!(out.status.success(), "{out:?}");
    let on_laptop = devices(&people, "laptop").await;
    assert!(on_laptop[1].starts_with("2\t"), "{on_laptop:?}");
    assert!(on_laptop[1].ends_with("\tthis device"), "{on_laptop:?}");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_code_fails_on_both_sides_and_links_nothing() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["bob"]).await;

    let out = run(people.sfc("laptop", &["device", "add", "bob", "12345"])).await;
    assert_fails_with(&out, "10 digits");

    let linking = Linking::start(&people, "bob").await;
    // The right slot, another secret.
    let (slot, secret) = linking.code.split_once('-').unwrap();
    let last = secret.chars().last().unwrap().to_digit(10).unwrap();
    let wrong = format!("{slot}-{}{}", &secret[..5], (last + 1) % 10);
    let right = linking.code.clone();
    let out = run(people.sfc("laptop", &["device", "add", "bob", &wrong])).await;
    assert_fails_with(&out, "the link failed");
    let (status, out, err) = linking.finish().await;
    assert!(!status.success(), "{out} {err}");
    assert!(err.contains("does not match"), "{err:?}");
    assert_eq!(err.lines().count(), 1, "{err:?}");

    assert_eq!(devices(&people, "bob").await.len(), 1);
    assert!(!people.home("laptop").join("keystore.msgpack").exists());
    let out = run(people.sfc("laptop", &["whoami"])).await;
    assert_fails_with(&out, "not logged in");
    // The code was used up: the right one does not work either now.
    let out = run(people.sfc("laptop", &["device", "add", "bob", &right])).await;
    assert_fails_with(&out, "the link failed");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_removed_device_is_told_so_and_cannot_log_in_again() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["bob"]).await;
    link(&people, "bob", "bob", "laptop", "laptop").await;

    // The laptop is receiving when it is removed.
    let mut command = people.sfc("laptop", &["recv", "--follow"]);
    command.stdout(Stdio::piped()).stderr(Stdio::piped());
    let receiving = command.spawn().unwrap();
    tokio::time::sleep(Duration::from_millis(1500)).await;

    let out = run(people.sfc("bob", &["device", "remove", "1"])).await;
    assert_fails_with(&out, "cannot remove itself");
    let out = run(people.sfc("bob", &["device", "remove", "2"])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(stdout(&out), "removed device 2\n");

    let out = tokio::time::timeout(Duration::from_secs(20), receiving.wait_with_output())
        .await
        .unwrap()
        .unwrap();
    assert!(!out.status.success(), "{out:?}");
    assert!(
        stderr(&out).contains("this device was removed from its account"),
        "{out:?}"
    );
    assert_eq!(devices(&people, "bob").await.len(), 1);

    // Its password login is refused as a removed device, and the way back is spelled out.
    let out = run(people.sfc("laptop", &["login", "bob"])).await;
    assert_fails_with(&out, "this device was removed from its account");
    assert_fails_with(&out, "sfc device add bob CODE");
    let out = run(people.sfc("laptop", &["recv"])).await;
    assert_fails_with(&out, "this device was removed from its account");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_fresh_home_is_pointed_to_linking_and_a_new_identity_removes_the_other_devices() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["bob"]).await;

    let out = run(people.sfc("laptop", &["login", "bob"])).await;
    assert_fails_with(&out, "sfc device add bob CODE");
    assert_fails_with(&out, "sfc device link");
    let out = run(people.sfc("laptop", &["whoami"])).await;
    assert_fails_with(&out, "not logged in");
    assert!(!people.home("laptop").join("keystore.msgpack").exists());

    // A linked home holds keys: a second link into it is refused before anything is asked.
    link(&people, "bob", "bob", "laptop", "laptop").await;
    let out = run(people.sfc("laptop", &["device", "add", "bob", "0000-000000"])).await;
    assert_fails_with(&out, "already holds the keys of bob");

    // Bob replaces the identity from his first home: the laptop holds the old one and goes.
    let out = run(people.sfc("bob", &["login", "--new-identity", "bob"])).await;
    assert!(out.status.success(), "{out:?}");
    assert!(stdout(&out).contains("with a new identity key"), "{out:?}");
    assert!(stdout(&out).contains("other devices"), "{out:?}");
    let on_phone = devices(&people, "bob").await;
    assert_eq!(on_phone.len(), 1, "{on_phone:?}");
    let out = run(people.sfc("laptop", &["devices"])).await;
    assert_fails_with(&out, "this device was removed from its account");
    server.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_linked_device_joins_the_accounts_groups_and_a_removed_one_leaves_them() {
    let server = TestServer::start().await;
    let people = People::signed_up(&server, &["alice", "bob"]).await;
    for args in [
        &["group", "create", "friends"][..],
        &["group", "add", "friends", "bob"][..],
    ] {
        let out = run(people.sfc("alice", args)).await;
        assert!(out.status.success(), "{out:?}");
    }

    // `sfc device link` adds the new device to alice's groups itself, once it has published
    // its key packages (`sfc device add` does before it ends).
    let linking = Linking::start(&people, "alice").await;
    let code = linking.code.clone();
    let added = run(people.sfc("laptop", &["device", "add", "alice", &code])).await;
    assert!(added.status.success(), "{added:?}");
    let (status, out, err) = linking.finish().await;
    assert!(status.success(), "{out} {err}");
    assert!(out.contains("added to groups: friends"), "{out} {err}");

    let out = run(people.sfc("bob", &["group", "send", "friends", "hi laptop"])).await;
    assert!(out.status.success(), "{out:?}");
    let laptop = run(people.sfc("laptop", &["recv"])).await;
    assert_eq!(stdout(&laptop), "friends/bob\thi laptop\n", "{laptop:?}");
    let out = run(people.sfc("laptop", &["group", "send", "friends", "from the laptop"])).await;
    assert!(out.status.success(), "{out:?}");
    let bob = run(people.sfc("bob", &["recv"])).await;
    assert_eq!(stdout(&bob), "friends/alice\tfrom the laptop\n", "{bob:?}");

    // Removing the laptop removes its leaf in the group, committed by the removing device.
    let out = run(people.sfc("alice", &["device", "remove", "2"])).await;
    assert!(out.status.success(), "{out:?}");
    assert_eq!(
        stdout(&out),
        "removed device 2\nremoved from groups: friends\n"
    );
    let members = run(people.sfc("bob", &["group", "members", "friends"])).await;
    assert_eq!(stdout(&members), "alice\t1\tadmin\nbob\t1\n", "{members:?}");
    let out = run(people.sfc("bob", &["group", "send", "friends", "after"])).await;
    assert!(out.status.success(), "{out:?}");
    let alice = run(people.sfc("alice", &["recv"])).await;
    assert!(
        stdout(&alice).ends_with("friends/bob\tafter\n"),
        "{alice:?}"
    );
    server.stop().await;
}
