//! The blob metrics on a real server: uploads, downloads and deletions counted, and the bytes
//! held as of the last sweep. A test binary of its own: the metrics recorder is one per
//! process, and the other blob tests would count into it.

mod common;

use std::time::{Duration, Instant};

use common::TestServer;
use common::metrics::{scrape, series};
use common::raw::Raw;
use securefastchat::protocol::{BlobId, Reply, Request};

fn held(reply: &Reply) -> u64 {
    match reply {
        Reply::BlobUpload { held, .. } => *held,
        other => panic!("expected blob_upload, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_count_blob_uploads_downloads_deletions_and_bytes() {
    let metrics = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap();
    let server = TestServer::start_with(|c| {
        c.metrics = Some(metrics);
        c.blob_sweep_interval = Duration::from_millis(200);
    })
    .await;
    let mut bob = Raw::signed_up(&server, "bob").await;
    let mut alice = Raw::signed_up(&server, "alice").await;
    let (whole, partial) = (BlobId([80; 16]), BlobId([81; 16]));
    let data = vec![7u8; 1000];
    let announce = |blob, length| Request::UploadBlob {
        blob,
        length,
        readers: vec!["bob".into()],
    };
    assert_eq!(held(&alice.call(10, announce(whole, 1000)).await), 0);
    assert_eq!(
        alice.upload(whole, 0, &data).await,
        Reply::BlobStored {
            blob: whole,
            length: 1000
        }
    );
    let reply = bob
        .call(
            10,
            Request::DownloadBlob {
                blob: whole,
                offset: 0,
            },
        )
        .await;
    assert!(matches!(reply, Reply::BlobDownload { .. }), "{reply:?}");
    assert_eq!(bob.blob_stream().await.1, data);
    assert_eq!(
        bob.call(11, Request::AckBlob { blob: whole }).await,
        Reply::BlobAcked { blob: whole }
    );
    assert_eq!(held(&alice.call(12, announce(partial, 2000)).await), 0);
    let failed = alice.upload(partial, 0, &data[..500]).await;
    assert!(
        matches!(failed, Reply::UploadFailed { held: 500, .. }),
        "{failed:?}"
    );

    let expected = [
        ("sfc_blob_uploads_total", 1.0),
        ("sfc_blob_downloads_total", 1.0),
        ("sfc_blobs_deleted_total", 1.0),
        ("sfc_blob_bytes_stored", 500.0),
    ];
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let text = scrape(metrics);
        let now: Vec<Option<f64>> = expected.iter().map(|(n, _)| series(&text, n)).collect();
        if now
            .iter()
            .zip(&expected)
            .all(|(got, (_, want))| *got == Some(*want))
        {
            assert!(text.contains("# HELP sfc_blob_bytes_stored "), "{text}");
            break;
        }
        assert!(Instant::now() < deadline, "{expected:?} vs {now:?}\n{text}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    server.stop().await;
}
