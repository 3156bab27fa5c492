//! The Kubernetes backend against kube's mock client (tower-test): each
//! test plays the API server, checks every request the backend sends
//! (method, path, query, body) and answers it, conflicts included.

use std::collections::BTreeMap;
use std::time::Duration;

use http::{Request, Response};
use kube::Client;
use kube::client::Body;
use serde_json::{Value, json};
use tower_test::mock::{self, Handle};

use super::lease::LeaderLease;
use super::*;
use crate::cluster::election::Round;

type Api = Handle<Request<Body>, Response<Body>>;

fn mock_client() -> (Client, Api) {
    let (svc, handle) = mock::pair::<Request<Body>, Response<Body>>();
    (Client::new(svc, "default"), handle)
}

/// Answers the next request, which must be `method path` (path may carry
/// a `?query` to look for); returns the request's JSON body.
async fn expect(api: &mut Api, method: &str, path: &str, status: u16, reply: Value) -> Value {
    let (req, send) = tokio::time::timeout(Duration::from_secs(5), api.next_request())
        .await
        .unwrap_or_else(|_| panic!("no request; expected {method} {path}"))
        .expect("client gone");
    let (want_path, want_query) = path.split_once('?').unwrap_or((path, ""));
    assert_eq!(req.method().as_str(), method, "{}", req.uri());
    assert_eq!(req.uri().path(), want_path);
    let query = req.uri().query().unwrap_or("").to_string();
    for part in want_query.split('&').filter(|p| !p.is_empty()) {
        assert!(query.contains(part), "query {query:?} lacks {part:?}");
    }
    let bytes = req.into_body().collect_bytes().await.unwrap();
    let body = if bytes.is_empty() {
        Value::Null
    } else {
        serde_json::from_slice(&bytes).unwrap()
    };
    send.send_response(
        Response::builder()
            .status(status)
            .header("content-type", "application/json")
            .body(Body::from(serde_json::to_vec(&reply).unwrap()))
            .unwrap(),
    );
    body
}

/// Nothing more is sent within a moment.
async fn expect_quiet(api: &mut Api) {
    let next = tokio::time::timeout(Duration::from_millis(200), api.next_request()).await;
    if let Ok(Some((req, _))) = next {
        panic!("unexpected request {} {}", req.method(), req.uri());
    }
}

fn status(code: u16, reason: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "message": reason, "reason": reason, "code": code})
}

const VOLUMES: &str = "/apis/strata.dev/v1alpha1/stratavolumes";

fn record(state: RecordState) -> VolumeRecord {
    VolumeRecord {
        name: "pvc-1".into(),
        volume_id: "v1".into(),
        capacity_bytes: 4096,
        parameters: BTreeMap::from([("fsType".to_string(), "xfs".to_string())]),
        source: Some(ContentSource::Snapshot("s1".into())),
        node: "n1".into(),
        anywhere: false,
        state,
        created_unix_ns: 7,
        moving: None,
        lost_with: None,
        claim: Some(crate::cluster::ClaimRef {
            namespace: "apps".into(),
            name: "data".into(),
        }),
    }
}

/// The object the server holds for `record(state)` at `rv`.
fn stored(state: Option<&str>, rv: &str, capacity: u64) -> Value {
    let mut o = json!({
        "apiVersion": "strata.dev/v1alpha1", "kind": "StrataVolume",
        "metadata": {"name": "v1", "resourceVersion": rv,
                     "labels": {NAME_HASH_LABEL: name_hash("pvc-1")}},
        "spec": {"csiName": "pvc-1", "capacityBytes": capacity, "parameters": {"fsType": "xfs"},
                 "source": {"snapshot": "s1"}, "node": "n1", "createdUnixNs": 7,
                 "claim": {"namespace": "apps", "name": "data"}}
    });
    if let Some(s) = state {
        o["status"] = json!({"state": s});
    }
    o
}

fn records(client: Client) -> KubeRecords {
    KubeRecords::new(client, tokio::runtime::Handle::current())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_record_is_created_then_its_status_set() {
    let (client, mut api) = mock_client();
    let r = records(client);
    let put = tokio::task::spawn_blocking(move || r.put_volume(&record(RecordState::Ready)));
    expect(
        &mut api,
        "GET",
        &format!("{VOLUMES}/v1"),
        404,
        status(404, "NotFound"),
    )
    .await;
    let created = expect(&mut api, "POST", VOLUMES, 201, stored(None, "1", 4096)).await;
    assert_eq!(created["spec"]["csiName"], "pvc-1");
    assert_eq!(created["spec"]["source"], json!({"snapshot": "s1"}));
    assert_eq!(
        created["spec"]["claim"],
        json!({"namespace": "apps", "name": "data"})
    );
    assert_eq!(
        created["metadata"]["labels"][NAME_HASH_LABEL],
        name_hash("pvc-1")
    );
    let st = expect(
        &mut api,
        "PUT",
        &format!("{VOLUMES}/v1/status"),
        200,
        stored(Some("Ready"), "2", 4096),
    )
    .await;
    assert_eq!(
        st["metadata"]["resourceVersion"], "1",
        "status written at the version created"
    );
    assert_eq!(st["status"]["state"], "Ready");
    put.await.unwrap().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_update_is_read_again_and_retried() {
    let (client, mut api) = mock_client();
    let r = records(client);
    let mut want = record(RecordState::Ready);
    want.capacity_bytes = 8192;
    let put = tokio::task::spawn_blocking(move || r.put_volume(&want));
    let path = format!("{VOLUMES}/v1");
    expect(
        &mut api,
        "GET",
        &path,
        200,
        stored(Some("Ready"), "5", 4096),
    )
    .await;
    let first = expect(&mut api, "PUT", &path, 409, status(409, "Conflict")).await;
    assert_eq!(first["metadata"]["resourceVersion"], "5");
    assert_eq!(first["spec"]["capacityBytes"], 8192);
    // Someone else wrote version 6 in between: read it, write on top.
    expect(
        &mut api,
        "GET",
        &path,
        200,
        stored(Some("Ready"), "6", 4096),
    )
    .await;
    let second = expect(
        &mut api,
        "PUT",
        &path,
        200,
        stored(Some("Ready"), "7", 8192),
    )
    .await;
    assert_eq!(second["metadata"]["resourceVersion"], "6");
    // The status already says Ready: no status write.
    put.await.unwrap().unwrap();
    expect_quiet(&mut api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_never_takes_a_loss_back() {
    let (client, mut api) = mock_client();
    let r = records(client);
    // A writer that read the record before `strata node forget` marked
    // it: its move ended (node n2 now), and it knows nothing of the loss.
    let mut want = record(RecordState::Ready);
    want.node = "n2".into();
    let put = tokio::task::spawn_blocking(move || r.put_volume(&want));
    let path = format!("{VOLUMES}/v1");
    let mut marked = stored(Some("Ready"), "5", 4096);
    marked["spec"]["lostWith"] = json!("n1");
    expect(&mut api, "GET", &path, 200, marked.clone()).await;
    let written = expect(&mut api, "PUT", &path, 200, marked).await;
    assert_eq!(written["metadata"]["resourceVersion"], "5");
    assert_eq!(written["spec"]["node"], "n2");
    assert_eq!(written["spec"]["lostWith"], "n1", "{written}");
    put.await.unwrap().unwrap();
    expect_quiet(&mut api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_update_changes_the_record_stored_and_never_brings_back_a_deleted_one() {
    let (client, mut api) = mock_client();
    let r = records(client);
    let path = format!("{VOLUMES}/v1");
    let to_n2 = |v: &mut VolumeRecord| {
        v.node = "n2".into();
        true
    };
    // Gone before it was read: nothing is written.
    let rr = r.clone();
    let put = tokio::task::spawn_blocking(move || rr.update_volume("v1", &mut { to_n2 }));
    expect(&mut api, "GET", &path, 404, status(404, "NotFound")).await;
    assert!(!put.await.unwrap().unwrap());
    expect_quiet(&mut api).await;
    // Changed on what is stored (a size written by someone else stays);
    // a conflict reads again and changes again.
    let rr = r.clone();
    let put = tokio::task::spawn_blocking(move || rr.update_volume("v1", &mut { to_n2 }));
    expect(
        &mut api,
        "GET",
        &path,
        200,
        stored(Some("Ready"), "5", 4096),
    )
    .await;
    expect(&mut api, "PUT", &path, 409, status(409, "Conflict")).await;
    expect(
        &mut api,
        "GET",
        &path,
        200,
        stored(Some("Ready"), "6", 8192),
    )
    .await;
    let written = expect(
        &mut api,
        "PUT",
        &path,
        200,
        stored(Some("Ready"), "7", 8192),
    )
    .await;
    assert_eq!(written["metadata"]["resourceVersion"], "6");
    assert_eq!(written["spec"]["node"], "n2");
    assert_eq!(written["spec"]["capacityBytes"], 8192);
    assert!(put.await.unwrap().unwrap());
    expect_quiet(&mut api).await;
    // Deleted between the read and the replace: not written again.
    let put = tokio::task::spawn_blocking(move || r.update_volume("v1", &mut { to_n2 }));
    expect(
        &mut api,
        "GET",
        &path,
        200,
        stored(Some("Ready"), "8", 4096),
    )
    .await;
    expect(&mut api, "PUT", &path, 404, status(404, "NotFound")).await;
    assert!(!put.await.unwrap().unwrap());
    expect_quiet(&mut api).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_conflicting_status_update_is_retried_and_gives_up_after_a_few() {
    let (client, mut api) = mock_client();
    let r = records(client);
    let put = tokio::task::spawn_blocking(move || r.put_volume(&record(RecordState::Ready)));
    let path = format!("{VOLUMES}/v1");
    for rv in 0..CONFLICT_RETRIES {
        let rv = (10 + rv).to_string();
        expect(
            &mut api,
            "GET",
            &path,
            200,
            stored(Some("Creating"), &rv, 4096),
        )
        .await;
        let st = expect(
            &mut api,
            "PUT",
            &format!("{path}/status"),
            409,
            status(409, "Conflict"),
        )
        .await;
        assert_eq!(st["metadata"]["resourceVersion"], rv.as_str());
    }
    let e = put.await.unwrap().unwrap_err();
    assert!(e.to_string().contains("conflicting"), "{e}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reads_are_plain_gets_and_paged_lists() {
    let (client, mut api) = mock_client();
    let r = records(client);
    // By name: one LIST by label; a hash collision is told apart by spec.
    let rr = r.clone();
    let by_name = tokio::task::spawn_blocking(move || rr.volume_by_name("pvc-1"));
    let mut other = stored(Some("Ready"), "3", 4096);
    other["metadata"]["name"] = json!("v0");
    other["spec"]["csiName"] = json!("pvc-other");
    let query = format!(
        "{VOLUMES}?labelSelector=strata.dev%2Fcsi-name-hash%3D{}",
        name_hash("pvc-1")
    );
    expect(
        &mut api,
        "GET",
        &query,
        200,
        json!({"apiVersion": "v1", "kind": "List", "metadata": {},
               "items": [other, stored(Some("Ready"), "4", 4096)]}),
    )
    .await;
    let got = by_name.await.unwrap().unwrap().unwrap();
    assert_eq!(got, record(RecordState::Ready));

    // A missing status reads as Creating (a create cut short).
    let rr = r.clone();
    let one = tokio::task::spawn_blocking(move || rr.volume("v1"));
    expect(
        &mut api,
        "GET",
        &format!("{VOLUMES}/v1"),
        200,
        stored(None, "4", 4096),
    )
    .await;
    assert_eq!(
        one.await.unwrap().unwrap().unwrap().state,
        RecordState::Creating
    );

    // Listing follows continue tokens.
    let rr = r.clone();
    let all = tokio::task::spawn_blocking(move || rr.volumes());
    let mut second = stored(Some("Ready"), "8", 4096);
    second["metadata"]["name"] = json!("v0");
    expect(
        &mut api,
        "GET",
        &format!("{VOLUMES}?limit=500"),
        200,
        json!({"apiVersion": "v1", "kind": "List", "metadata": {"continue": "page2"},
               "items": [stored(Some("Ready"), "4", 4096)]}),
    )
    .await;
    expect(
        &mut api,
        "GET",
        &format!("{VOLUMES}?continue=page2"),
        200,
        json!({"apiVersion": "v1", "kind": "List", "metadata": {}, "items": [second]}),
    )
    .await;
    let ids: Vec<String> = all
        .await
        .unwrap()
        .unwrap()
        .into_iter()
        .map(|v| v.volume_id)
        .collect();
    assert_eq!(ids, ["v0", "v1"], "sorted by ID");

    // Deleting what is gone is fine.
    let rr = r.clone();
    let del = tokio::task::spawn_blocking(move || rr.delete_volume("v9"));
    expect(
        &mut api,
        "DELETE",
        &format!("{VOLUMES}/v9"),
        404,
        status(404, "NotFound"),
    )
    .await;
    del.await.unwrap().unwrap();
}

/// Node n1's record as its controller saw it last: not answering.
fn stale_n1() -> NodeRecord {
    NodeRecord {
        node_id: "n1".into(),
        agent_address: "10.0.0.1:9809".into(),
        version: "0.1.0".into(),
        capacity_bytes: 100,
        available_bytes: 50,
        provisioned_bytes: 20,
        max_volumes: 8,
        volumes: 2,
        state: NodeState::Stale,
        message: "connection refused".into(),
        last_seen_unix_ns: 9,
        draining: false,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_records_keep_their_report_in_the_status() {
    let (client, mut api) = mock_client();
    let r = records(client);
    let rec = stale_n1();
    let want = rec.clone();
    let rr = r.clone();
    let put = tokio::task::spawn_blocking(move || rr.put_node(&want));
    let path = "/apis/strata.dev/v1alpha1/stratanodes/n1";
    let node = json!({"apiVersion": "strata.dev/v1alpha1", "kind": "StrataNode",
                      "metadata": {"name": "n1", "resourceVersion": "3"},
                      "spec": {"agentAddress": "10.0.0.1:9809"}});
    expect(&mut api, "GET", path, 200, node.clone()).await;
    let st = expect(&mut api, "PUT", &format!("{path}/status"), 200, node).await;
    assert_eq!(st["status"]["state"], "Stale");
    assert_eq!(st["status"]["availableBytes"], 50);
    put.await.unwrap().unwrap();

    let got = tokio::task::spawn_blocking(move || r.node("n1"));
    let mut back = st.clone();
    back["metadata"]["resourceVersion"] = json!("4");
    expect(&mut api, "GET", path, 200, back).await;
    assert_eq!(got.await.unwrap().unwrap(), Some(rec));
}

/// A node's report keeps the drain the controller set (the report was
/// read before it), and only `set_node_draining` changes it, over the
/// object as it is.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_node_report_keeps_the_drain_and_only_the_drain_call_changes_it() {
    let (client, mut api) = mock_client();
    let r = records(client);
    let rec = NodeRecord {
        provisioned_bytes: 0,
        max_volumes: 0,
        volumes: 0,
        state: NodeState::Ready,
        message: String::new(),
        ..stale_n1()
    };
    let path = "/apis/strata.dev/v1alpha1/stratanodes/n1";
    let draining = json!({"apiVersion": "strata.dev/v1alpha1", "kind": "StrataNode",
                          "metadata": {"name": "n1", "resourceVersion": "3"},
                          "spec": {"agentAddress": "10.0.0.1:9809", "draining": true}});
    let rr = r.clone();
    let want = rec.clone();
    let put = tokio::task::spawn_blocking(move || rr.put_node(&want));
    expect(&mut api, "GET", path, 200, draining.clone()).await;
    // The spec is as it was: only the status is written.
    let st = expect(&mut api, "PUT", &format!("{path}/status"), 200, draining).await;
    assert_eq!(st["spec"]["draining"], true);
    put.await.unwrap().unwrap();

    let undrain = tokio::task::spawn_blocking(move || r.set_node_draining("n1", false));
    let mut now = st.clone();
    now["metadata"]["resourceVersion"] = json!("4");
    expect(&mut api, "GET", path, 200, now).await;
    let spec = expect(&mut api, "PUT", path, 200, st.clone()).await;
    assert_eq!(spec["spec"]["draining"], false);
    assert_eq!(spec["metadata"]["resourceVersion"], "4");
    assert!(undrain.await.unwrap().unwrap());
}

const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/strata/leases/strata-controller";

fn lease(client: Client, me: &str) -> LeaderLease {
    LeaderLease::new(
        client,
        "strata",
        "strata-controller",
        me,
        Some(format!("{me}.pods:9812")),
        Duration::from_secs(15),
    )
}

/// One election round, run while the test answers its requests.
fn acquire(l: &LeaderLease) -> tokio::task::JoinHandle<Result<Round, super::lease::LeaseError>> {
    let l = l.clone();
    tokio::spawn(async move { l.try_acquire().await })
}

fn release(l: &LeaderLease) -> tokio::task::JoinHandle<Result<bool, super::lease::LeaseError>> {
    let l = l.clone();
    tokio::spawn(async move { l.release().await })
}

fn held(holder: &str, renewed: k8s_openapi::jiff::Timestamp, rv: &str) -> Value {
    let t = renewed.strftime("%Y-%m-%dT%H:%M:%S%.6fZ").to_string();
    json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
           "metadata": {"name": "strata-controller", "namespace": "strata", "resourceVersion": rv,
                        "annotations": {"strata.dev/controller-address": format!("{holder}.pods:9812")}},
           "spec": {"holderIdentity": holder, "leaseDurationSeconds": 15,
                    "acquireTime": t, "renewTime": t, "leaseTransitions": 2}})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_lease_is_taken_when_free_renewed_by_its_holder_and_kept_from_others() {
    use k8s_openapi::jiff::{SignedDuration, Timestamp};
    let (client, mut api) = mock_client();
    let me = lease(client.clone(), "ctl-a");
    let collection = LEASE.rsplit_once('/').unwrap().0;

    // Nobody holds it: created with us as holder.
    let round = acquire(&me);
    expect(&mut api, "GET", LEASE, 404, status(404, "NotFound")).await;
    let created = expect(
        &mut api,
        "POST",
        collection,
        201,
        held("ctl-a", Timestamp::now(), "1"),
    )
    .await;
    assert_eq!(created["spec"]["holderIdentity"], "ctl-a");
    assert_eq!(created["spec"]["leaseDurationSeconds"], 15);
    assert_eq!(
        created["metadata"]["annotations"]["strata.dev/controller-address"],
        "ctl-a.pods:9812"
    );
    assert_eq!(round.await.unwrap().unwrap(), Round::Leading);

    // Ours: a renewal keeps the acquire time and transitions.
    let acquired = Timestamp::now() - SignedDuration::from_secs(5);
    let round = acquire(&me);
    expect(&mut api, "GET", LEASE, 200, held("ctl-a", acquired, "2")).await;
    let renewed = expect(
        &mut api,
        "PUT",
        LEASE,
        200,
        held("ctl-a", Timestamp::now(), "3"),
    )
    .await;
    assert_eq!(renewed["metadata"]["resourceVersion"], "2");
    assert_eq!(renewed["spec"]["leaseTransitions"], 2);
    assert_eq!(
        renewed["spec"]["acquireTime"],
        held("ctl-a", acquired, "2")["spec"]["acquireTime"]
    );
    assert_ne!(renewed["spec"]["renewTime"], renewed["spec"]["acquireTime"]);
    assert_eq!(round.await.unwrap().unwrap(), Round::Leading);

    // Someone else renewed it recently: not ours, nothing written, and
    // its address is where calls go.
    let round = acquire(&me);
    expect(
        &mut api,
        "GET",
        LEASE,
        200,
        held("ctl-b", Timestamp::now(), "4"),
    )
    .await;
    assert_eq!(
        round.await.unwrap().unwrap(),
        Round::Following(Some("ctl-b.pods:9812".into()))
    );
    expect_quiet(&mut api).await;

    // Its holder stopped renewing: taken over, one more transition.
    let old = Timestamp::now() - SignedDuration::from_secs(60);
    let round = acquire(&me);
    expect(&mut api, "GET", LEASE, 200, held("ctl-b", old, "5")).await;
    let taken = expect(
        &mut api,
        "PUT",
        LEASE,
        200,
        held("ctl-a", Timestamp::now(), "6"),
    )
    .await;
    assert_eq!(taken["spec"]["holderIdentity"], "ctl-a");
    assert_eq!(taken["spec"]["leaseTransitions"], 3);
    assert_eq!(taken["metadata"]["resourceVersion"], "5");
    assert_eq!(
        taken["metadata"]["annotations"]["strata.dev/controller-address"],
        "ctl-a.pods:9812"
    );
    assert_eq!(round.await.unwrap().unwrap(), Round::Leading);

    // Two candidates race for an expired lease: the one whose write is
    // refused with a conflict is not the leader.
    let round = acquire(&me);
    expect(&mut api, "GET", LEASE, 200, held("ctl-b", old, "7")).await;
    expect(&mut api, "PUT", LEASE, 409, status(409, "Conflict")).await;
    assert_eq!(round.await.unwrap().unwrap(), Round::Following(None));

    // The API server fails: an error, not a verdict.
    let round = acquire(&me);
    expect(&mut api, "GET", LEASE, 500, status(500, "InternalError")).await;
    assert!(round.await.unwrap().is_err());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_leader_that_stops_gives_the_lease_up_and_nobody_elses() {
    use k8s_openapi::jiff::Timestamp;
    let (client, mut api) = mock_client();
    let me = lease(client, "ctl-a");

    // Ours: written back without a holder or an address, so the next
    // candidate takes it at once.
    let released = release(&me);
    expect(
        &mut api,
        "GET",
        LEASE,
        200,
        held("ctl-a", Timestamp::now(), "8"),
    )
    .await;
    let written = expect(&mut api, "PUT", LEASE, 200, json!({})).await;
    assert!(written["spec"]["holderIdentity"].is_null(), "{written}");
    assert!(
        written["metadata"]["annotations"]["strata.dev/controller-address"].is_null(),
        "{written}"
    );
    assert_eq!(written["metadata"]["resourceVersion"], "8");
    assert!(released.await.unwrap().unwrap());

    // Another's: left alone.
    let released = release(&me);
    expect(
        &mut api,
        "GET",
        LEASE,
        200,
        held("ctl-b", Timestamp::now(), "9"),
    )
    .await;
    assert!(!released.await.unwrap().unwrap());
    expect_quiet(&mut api).await;

    // Ours, but rewritten meanwhile (a conflict): not ours to release.
    let released = release(&me);
    expect(
        &mut api,
        "GET",
        LEASE,
        200,
        held("ctl-a", Timestamp::now(), "10"),
    )
    .await;
    expect(&mut api, "PUT", LEASE, 409, status(409, "Conflict")).await;
    assert!(!released.await.unwrap().unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_are_posted_on_the_claim() {
    use crate::cluster::{ClaimRef, EventKind, Events};
    let (client, mut api) = mock_client();
    let events = super::events::KubeEvents::new(client, "ctl-a".into());
    let claim = ClaimRef {
        namespace: "apps".into(),
        name: "data".into(),
    };
    events.emit(
        &claim,
        EventKind::Normal,
        "Placed",
        "volume v1 is on node n1",
    );
    // The claim's UID first: `kubectl describe pvc` shows only the Events
    // that name it.
    expect(
        &mut api,
        "GET",
        "/api/v1/namespaces/apps/persistentvolumeclaims/data",
        200,
        json!({"apiVersion": "v1", "kind": "PersistentVolumeClaim",
               "metadata": {"name": "data", "namespace": "apps", "uid": "u-1"}}),
    )
    .await;
    let posted = expect(
        &mut api,
        "POST",
        "/api/v1/namespaces/apps/events",
        201,
        json!({}),
    )
    .await;
    assert_eq!(posted["involvedObject"]["kind"], "PersistentVolumeClaim");
    assert_eq!(posted["involvedObject"]["name"], "data");
    assert_eq!(posted["involvedObject"]["uid"], "u-1");
    assert_eq!(posted["action"], "Provisioning");
    assert_eq!(posted["reason"], "Placed");
    assert_eq!(posted["type"], "Normal");
    assert_eq!(posted["reportingInstance"], "ctl-a");
    assert_eq!(posted["metadata"]["generateName"], "data.");

    // A claim that cannot be read (gone, or no right to): the Event goes
    // out without its UID.
    events.emit(
        &claim,
        EventKind::Warning,
        "MoveRolledBack",
        "the move of volume v1 to node n2 was rolled back",
    );
    expect(
        &mut api,
        "GET",
        "/api/v1/namespaces/apps/persistentvolumeclaims/data",
        403,
        status(403, "Forbidden"),
    )
    .await;
    let posted = expect(
        &mut api,
        "POST",
        "/api/v1/namespaces/apps/events",
        201,
        json!({}),
    )
    .await;
    assert!(posted["involvedObject"]["uid"].is_null(), "{posted}");
    assert_eq!(posted["action"], "Moving");
    assert_eq!(posted["type"], "Warning");
}

#[test]
fn the_claim_comes_from_the_provisioners_extra_metadata() {
    use crate::cluster::ClaimRef;
    let p = std::collections::HashMap::from([
        (
            "csi.storage.k8s.io/pvc/name".to_string(),
            "data".to_string(),
        ),
        (
            "csi.storage.k8s.io/pvc/namespace".to_string(),
            "apps".to_string(),
        ),
    ]);
    assert_eq!(
        ClaimRef::from_parameters(&p),
        Some(ClaimRef {
            namespace: "apps".into(),
            name: "data".into()
        })
    );
    assert_eq!(ClaimRef::from_parameters(&Default::default()), None);
}
