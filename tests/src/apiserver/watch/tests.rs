use std::{
    collections::BTreeSet,
    io::{BufRead as _, BufReader},
};

use super::*;
use crate::{
    apiserver::{ClusterApiServer, list_page},
    cluster::GeneratedCluster,
};

/// A request as `read_request` makes it.
fn request(path: &str, query: &[(&str, &str)]) -> Request {
    Request {
        path: path.to_owned(),
        query: query
            .iter()
            .map(|(key, value)| ((*key).to_owned(), (*value).to_owned()))
            .collect(),
    }
}

fn page(store: &Store, path: &str, query: &[(&str, &str)]) -> Result<Value, Value> {
    list_page(store, path, &request(path, query))
        .map(|body| serde_json::from_str(&body).expect("a list page is JSON"))
}

fn names(list: &Value) -> Vec<String> {
    list["items"]
        .as_array()
        .expect("items")
        .iter()
        .map(|item| item["metadata"]["name"].as_str().unwrap().to_owned())
        .collect()
}

const JOINED: ClusterChange = ClusterChange::PodJoined {
    deployment: 1,
    ordinal: 0,
};
const LEFT: ClusterChange = ClusterChange::PodLeft {
    deployment: 1,
    ordinal: 0,
};

#[test]
fn changes_take_the_next_version_and_lists_serve_them() {
    let cluster = GeneratedCluster::new(30, 4);
    let mut store = Store::new(&cluster).unwrap();
    let pods = page(&store, PODS, &[]).unwrap();
    assert_eq!(pods["metadata"]["resourceVersion"], "1000");
    assert_eq!(names(&pods).len(), 30);

    assert_eq!(change(&mut store, &JOINED).unwrap(), 1001);
    let pods = page(&store, PODS, &[]).unwrap();
    assert_eq!(pods["metadata"]["resourceVersion"], "1001");
    assert!(names(&pods).contains(&"dep-1-joined-0".to_owned()));
    let joined = pods["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|pod| pod["metadata"]["name"] == "dep-1-joined-0")
        .unwrap();
    // Shaped as the generated pods are served: a replica of its deployment, running.
    assert_eq!(joined["metadata"]["resourceVersion"], "1001");
    assert_eq!(joined["metadata"]["labels"]["app"], "dep-1");
    assert_eq!(
        joined["metadata"]["ownerReferences"][0]["name"],
        "dep-1-7d9f8c6b5"
    );
    assert_eq!(joined["status"]["podIP"], "10.250.0.0");
    assert!(joined["metadata"]["managedFields"].is_array());
    let error = change(&mut store, &JOINED).unwrap_err().to_string();
    assert!(error.contains("ns-0/dep-1-joined-0"), "{error}");

    let revised = ClusterChange::PolicyRevised {
        policy: 0,
        revision: 1,
    };
    assert_eq!(change(&mut store, &revised).unwrap(), 1002);
    let policies = page(&store, POLICIES, &[]).unwrap();
    let p0 = &policies["items"][0];
    assert_eq!(p0["metadata"]["name"], "p0");
    assert_eq!(p0["metadata"]["resourceVersion"], "1002");
    assert_eq!(p0["spec"]["egress"][0]["ports"][1]["port"], 9001);

    assert_eq!(change(&mut store, &LEFT).unwrap(), 1003);
    assert_eq!(names(&page(&store, PODS, &[]).unwrap()).len(), 30);
    assert!(change(&mut store, &LEFT).is_err(), "gone already");
    let missing = ClusterChange::PolicyRevised {
        policy: 99,
        revision: 1,
    };
    assert!(change(&mut store, &missing).is_err());
    assert_eq!(
        store.resource_version, 1003,
        "failed changes take no version"
    );
    // Every change made is kept, in order, for watches that resume.
    let kept: Vec<(u64, &str)> = store
        .watches
        .history
        .iter()
        .map(|event| (event.resource_version, event.path))
        .collect();
    assert_eq!(kept, [(1001, PODS), (1002, POLICIES), (1003, PODS)]);
    let line: Value = serde_json::from_str(&store.watches.history[2].line).unwrap();
    assert_eq!(line["type"], "DELETED");
    assert_eq!(line["object"]["metadata"]["name"], "dep-1-joined-0");
}

#[test]
fn pages_continue_after_the_last_key_and_expire_when_the_list_changes() {
    let cluster = GeneratedCluster::new(30, 4);
    let mut store = Store::new(&cluster).unwrap();
    let mut seen = Vec::new();
    let mut token: Option<String> = None;
    for _ in 0..10 {
        let mut query = vec![("limit", "7")];
        if let Some(token) = &token {
            query.push(("continue", token));
        }
        let list = page(&store, PODS, &query).unwrap();
        seen.extend(names(&list));
        token = list["metadata"]["continue"].as_str().map(str::to_owned);
        match &token {
            Some(_) => assert_eq!(
                list["metadata"]["remainingItemCount"].as_u64().unwrap(),
                30 - seen.len() as u64
            ),
            None => break,
        }
    }
    assert_eq!(seen.len(), 30);
    assert_eq!(seen.iter().collect::<BTreeSet<_>>().len(), 30, "no repeats");

    let first = page(&store, PODS, &[("limit", "7")]).unwrap();
    let token = first["metadata"]["continue"].as_str().unwrap().to_owned();
    change(&mut store, &JOINED).unwrap();
    let expired = page(&store, PODS, &[("limit", "7"), ("continue", &token)]).unwrap_err();
    assert_eq!(expired["code"], 410);
    assert_eq!(expired["reason"], "Expired");
    let broken = page(&store, PODS, &[("continue", "1001.x.zz")]).unwrap_err();
    assert_eq!(broken["code"], 400);
}

/// Reads one watch line, or `None` if none comes within `timeout`.
fn next_event(reader: &mut BufReader<TcpStream>, timeout: Duration) -> Option<Value> {
    reader.get_ref().set_read_timeout(Some(timeout)).unwrap();
    let mut line = String::new();
    match reader.read_line(&mut line) {
        Ok(n) if n > 0 => Some(serde_json::from_str(&line).expect("a watch line is JSON")),
        _ => None,
    }
}

/// Opens a watch of `path` from `version` on `server`, in `netns`, and reads past the
/// response head.
fn open_watch(
    netns: &str,
    server: &ClusterApiServer,
    path: &str,
    version: u64,
) -> BufReader<TcpStream> {
    let stream = crate::run_in_netns(netns, || {
        TcpStream::connect_timeout(&server.addr(), Duration::from_secs(2)).unwrap()
    });
    let mut writer = stream.try_clone().unwrap();
    write!(
        writer,
        "GET {path}?watch=true&resourceVersion={version}&timeoutSeconds=20 HTTP/1.1\r\nHost: test\r\n\r\n"
    )
    .unwrap();
    let mut reader = BufReader::new(stream);
    reader
        .get_ref()
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let mut status = String::new();
    reader.read_line(&mut status).unwrap();
    assert!(status.starts_with("HTTP/1.1 200"), "{status}");
    loop {
        let mut header = String::new();
        reader.read_line(&mut header).unwrap();
        if header == "\r\n" || header.is_empty() {
            break;
        }
    }
    reader
}

/// Waits (bounded) until the server counts `n` open watches.
fn wait_open(server: &ClusterApiServer, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(5);
    while server.open_watches() != n {
        assert!(
            Instant::now() < deadline,
            "{} watches open, not {n}",
            server.open_watches()
        );
        std::thread::sleep(Duration::from_millis(10));
    }
}

#[test]
fn open_watches_receive_each_change_once_and_resumed_ones_catch_up_privileged() {
    if !crate::require_root("watch events") {
        return;
    }
    let topology = crate::Topology::new().unwrap();
    let netns = topology.node_netns();
    let cluster = GeneratedCluster::new(30, 4);
    let server = ClusterApiServer::start(netns, &cluster).unwrap();
    let mut pods = open_watch(netns, &server, PODS, 1000);
    let mut policies = open_watch(netns, &server, POLICIES, 1000);
    wait_open(&server, 2);

    assert_eq!(server.change(&JOINED).unwrap(), 1001);
    let added = next_event(&mut pods, Duration::from_secs(2)).expect("the pod watch hears it");
    assert_eq!(added["type"], "ADDED");
    assert_eq!(added["object"]["metadata"]["name"], "dep-1-joined-0");
    assert_eq!(added["object"]["metadata"]["resourceVersion"], "1001");
    assert_eq!(
        next_event(&mut policies, Duration::from_millis(300)),
        None,
        "a policy watch hears no pod"
    );
    server
        .change(&ClusterChange::PolicyRevised {
            policy: 1,
            revision: 2,
        })
        .unwrap();
    let modified = next_event(&mut policies, Duration::from_secs(2)).unwrap();
    assert_eq!(modified["type"], "MODIFIED");
    assert_eq!(modified["object"]["metadata"]["name"], "p1");
    assert_eq!(
        modified["object"]["spec"]["egress"][0]["ports"][1]["port"],
        9002
    );
    server.change(&LEFT).unwrap();
    let deleted = next_event(&mut pods, Duration::from_secs(2)).unwrap();
    assert_eq!(deleted["type"], "DELETED");
    assert_eq!(deleted["object"]["metadata"]["resourceVersion"], "1003");
    assert_eq!(
        next_event(&mut pods, Duration::from_millis(300)),
        None,
        "once"
    );

    // A client resuming from 1001 hears what came after, then new changes.
    let mut resumed = open_watch(netns, &server, PODS, 1001);
    let caught_up = next_event(&mut resumed, Duration::from_secs(2)).unwrap();
    assert_eq!(caught_up["type"], "DELETED");
    wait_open(&server, 3);
    server.change(&JOINED).unwrap();
    for watch in [&mut pods, &mut resumed] {
        let event = next_event(watch, Duration::from_secs(2)).unwrap();
        assert_eq!(event["object"]["metadata"]["resourceVersion"], "1004");
    }
    // From before the generated cluster: expired, as from a compacted API server.
    let mut expired = open_watch(netns, &server, PODS, 5);
    let error = next_event(&mut expired, Duration::from_secs(2)).unwrap();
    assert_eq!(error["type"], "ERROR");
    assert_eq!(error["object"]["code"], 410);

    drop((pods, resumed));
    wait_open(&server, 1);
    assert_eq!(server.served().events.load(Ordering::Relaxed), 6);
}
