//! One conformance suite for every registered store kind: a local directory and S3 (moto).

use std::sync::Arc;

use bytes::Bytes;
use lifeboat::policy::{ChecksumMode, Location, RepositoryConfig, S3Config};
use lifeboat::store::{self, ObjectStore, StoreError};
use lifeboat_tests::s3;
use lifeboat_tests::CancellationToken;
use tokio::io::AsyncReadExt;

/// Puts (`put`) or deletes `keys`, 32 at a time.
async fn put_or_delete(store: &Arc<dyn ObjectStore>, keys: &[String], put: bool) {
    for chunk in keys.chunks(32) {
        let mut all = tokio::task::JoinSet::new();
        for k in chunk {
            let (store, k) = (store.clone(), k.clone());
            all.spawn(async move {
                if put {
                    store.put(&k, Bytes::from_static(b"x")).await
                } else {
                    store.delete(&k).await
                }
            });
        }
        while let Some(r) = all.join_next().await {
            r.unwrap().unwrap();
        }
    }
}

async fn conformance(store: Arc<dyn ObjectStore>) {
    let what = store.describe();
    // put / get / size / open
    store
        .put("a/one", Bytes::from_static(b"hello"))
        .await
        .unwrap();
    assert_eq!(&store.get("a/one").await.unwrap()[..], b"hello", "{what}");
    assert_eq!(store.size("a/one").await.unwrap(), Some(5), "{what}");
    assert_eq!(store.size("a/none").await.unwrap(), None, "{what}");
    let mut s = String::new();
    store
        .open("a/one")
        .await
        .unwrap()
        .read_to_string(&mut s)
        .await
        .unwrap();
    assert_eq!(s, "hello");
    // overwrite is whole
    store.put("a/one", Bytes::from_static(b"hi")).await.unwrap();
    assert_eq!(&store.get("a/one").await.unwrap()[..], b"hi", "{what}");
    // ranges: within, cut short by the end, past the end; not found as for a GET
    store
        .put("a/digits", Bytes::from_static(b"0123456789"))
        .await
        .unwrap();
    for (offset, len, want) in [
        (0, 4, &b"0123"[..]),
        (3, 4, b"3456"),
        (8, 4, b"89"),
        (10, 4, b""),
        (20, 4, b""),
    ] {
        let got = store.get_range("a/digits", offset, len).await.unwrap();
        assert_eq!(&got[..], want, "{what}: {len} bytes from {offset}");
    }
    assert!(
        matches!(
            store.get_range("a/none", 0, 4).await,
            Err(StoreError::NotFound { .. })
        ),
        "{what}"
    );
    assert_eq!(store.download_streams(), 4, "{what}");
    store.delete("a/digits").await.unwrap();
    // not found is its own kind
    assert!(
        matches!(store.get("a/none").await, Err(StoreError::NotFound { .. })),
        "{what}"
    );
    assert!(
        matches!(store.open("a/none").await, Err(StoreError::NotFound { .. })),
        "{what}"
    );
    // list is recursive, sorted, relative, prefix-filtered
    store
        .put("a/b/two", Bytes::from_static(b"22"))
        .await
        .unwrap();
    store
        .put("ab/three", Bytes::from_static(b"333"))
        .await
        .unwrap();
    let keys: Vec<(String, u64)> = store
        .list("a/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| (o.key, o.size))
        .collect();
    assert_eq!(
        keys,
        vec![("a/b/two".to_string(), 2), ("a/one".to_string(), 2)],
        "{what}"
    );
    let all: Vec<String> = store
        .list("")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(all, vec!["a/b/two", "a/one", "ab/three"], "{what}");
    // list_page: pages of LIST_PAGE in key order, resumed after a key, with a directory's keys
    // sorting as `name/` (after `name.x`), the same keys as one list
    let keys: Vec<String> = (0..store::LIST_PAGE + 10)
        .map(|i| format!("p/d{}/k{i:05}", i % 3))
        .chain(["p/d0.x".to_string(), "p/d2a".to_string(), "pq".to_string()])
        .collect();
    put_or_delete(&store, &keys, true).await;
    let listed: Vec<String> = store
        .list("p/")
        .await
        .unwrap()
        .into_iter()
        .map(|o| o.key)
        .collect();
    assert_eq!(listed.len(), store::LIST_PAGE + 12, "{what}");
    let (mut paged, mut after, mut pages) = (Vec::new(), None::<String>, 0);
    loop {
        let (page, more) = store.list_page("p/", after.as_deref()).await.unwrap();
        pages += 1;
        assert!(page.len() <= store::LIST_PAGE, "{what}");
        paged.extend(page.into_iter().map(|o| o.key));
        after = paged.last().cloned();
        if !more {
            break;
        }
    }
    assert_eq!(pages, 2, "{what}");
    assert_eq!(paged, listed, "{what}");
    let (tail, more) = store.list_page("p/", Some("p/d1")).await.unwrap();
    assert!(!more, "{what}");
    let want: Vec<&String> = listed.iter().filter(|k| k.as_str() > "p/d1").collect();
    assert_eq!(
        tail.iter().map(|o| &o.key).collect::<Vec<_>>(),
        want,
        "{what}"
    );
    put_or_delete(&store, &keys, false).await;
    // delete, also of a missing object
    store.delete("a/one").await.unwrap();
    store.delete("a/one").await.unwrap();
    assert_eq!(store.size("a/one").await.unwrap(), None);

    // multipart: parts in any order, complete makes one object
    let part = |c: u8| Bytes::from(vec![c; 5 << 20]);
    let up = store.start_upload("m/obj").await.unwrap();
    assert_eq!(
        store.size("m/obj").await.unwrap(),
        None,
        "{what}: invisible until complete"
    );
    up.put_part(2, 5 << 20, part(b'b')).await.unwrap();
    up.put_part(1, 0, part(b'a')).await.unwrap();
    up.put_part(3, 10 << 20, Bytes::from_static(b"tail"))
        .await
        .unwrap();
    assert_eq!(store.pending_uploads().await.unwrap().len(), 1, "{what}");
    up.complete().await.unwrap();
    let got = store.get("m/obj").await.unwrap();
    assert_eq!(got.len(), (10 << 20) + 4, "{what}");
    assert!(
        got[..5 << 20].iter().all(|&b| b == b'a')
            && got[5 << 20..10 << 20].iter().all(|&b| b == b'b')
    );
    assert_eq!(&got[10 << 20..], b"tail");
    assert!(store.pending_uploads().await.unwrap().is_empty(), "{what}");

    // abort leaves nothing
    let up = store.start_upload("m/aborted").await.unwrap();
    up.put_part(1, 0, part(b'x')).await.unwrap();
    up.abort().await.unwrap();
    assert_eq!(store.size("m/aborted").await.unwrap(), None, "{what}");
    assert!(store.pending_uploads().await.unwrap().is_empty(), "{what}");

    // the streaming uploader, cancelled half-way, leaves nothing either
    let (tx, rx) = tokio::sync::mpsc::channel(4);
    tx.send(part(b'1')).await.unwrap();
    tx.send(part(b'2')).await.unwrap();
    let cancel = CancellationToken::new();
    let task = tokio::spawn(store::upload_parts(
        store.clone(),
        "m/cancelled".into(),
        rx,
        2,
        cancel.clone(),
    ));
    while store.pending_uploads().await.unwrap().is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    cancel.cancel();
    assert!(
        matches!(task.await.unwrap(), Err(StoreError::Cancelled)),
        "{what}"
    );
    drop(tx);
    assert_eq!(store.size("m/cancelled").await.unwrap(), None, "{what}");
    assert!(store.pending_uploads().await.unwrap().is_empty(), "{what}");

    // the probe writes, reads and deletes under the root
    store::probe(store.as_ref()).await.unwrap();
    assert!(store.list("probe/").await.unwrap().is_empty(), "{what}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fs_store_conforms() {
    let dir = tempfile::tempdir().unwrap();
    let cfg = RepositoryConfig {
        location: Location::Fs {
            root: dir.path().join("repo"),
        },
        part_size: 5 << 20,
        parts_in_flight: 2,
        download_streams: 4,
    };
    conformance(store::open(&cfg).await.unwrap()).await;
}

async fn s3_store(checksums: ChecksumMode, prefix: &str) -> Arc<dyn ObjectStore> {
    let server = s3();
    let bucket = server.create_bucket().await;
    let cfg = RepositoryConfig {
        location: Location::S3(S3Config {
            bucket,
            prefix: prefix.into(),
            endpoint: Some(server.endpoint.clone()),
            credentials_profile: None,
            region: "us-east-1".into(),
            force_path_style: true,
            checksums,
            storage_class: None,
            object_lock: None,
            server_side_encryption: None,
        }),
        part_size: 5 << 20,
        parts_in_flight: 2,
        download_streams: 4,
    };
    store::open(&cfg).await.unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms_without_checksum_headers() {
    conformance(s3_store(ChecksumMode::WhenRequired, "team/repo").await).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_store_conforms_with_sha256_checksums_and_no_prefix() {
    conformance(s3_store(ChecksumMode::Always, "").await).await;
}
