//! Objects as an API server serves them read into the trimmed types, and from there into
//! the snapshot's, with everything Egret does not read skipped.

use std::sync::Arc;

use kube::Resource as _;
use serde_json::json;

use super::*;
use crate::{
    policy::{NamedPort, Protocol},
    source::objects,
    state::{self, LabelSets, PodPhase},
};

/// A pod of a `ReplicaSet` as the API server lists it (shortened from a real one).
fn served_pod(name: &str, app: &str, ip: &str) -> serde_json::Value {
    json!({
        "metadata": {
            "name": name, "namespace": "shop", "uid": format!("uid-{name}"),
            "resourceVersion": "4711", "generateName": "web-7d9f8c6b5-",
            "creationTimestamp": "2025-11-20T09:00:00Z",
            "labels": {"app": app, "pod-template-hash": "7d9f8c6b5"},
            "annotations": {"kubectl.kubernetes.io/restartedAt": "2025-11-20T09:00:00Z"},
            "ownerReferences": [{"apiVersion": "apps/v1", "kind": "ReplicaSet", "name": "web-7d9f8c6b5",
                "uid": "0b1c", "controller": true, "blockOwnerDeletion": true}],
            "managedFields": [{"manager": "kube-controller-manager", "operation": "Update",
                "apiVersion": "v1", "fieldsType": "FieldsV1", "fieldsV1": {"f:metadata": {}}}]
        },
        "spec": {
            "nodeName": "node-1", "restartPolicy": "Always", "dnsPolicy": "ClusterFirst",
            "volumes": [{"name": "token", "projected": {"sources": []}}],
            "containers": [{"name": "main", "image": "app:1", "env": [{"name": "A", "value": "b"}],
                "ports": [{"name": "http", "containerPort": 8080, "protocol": "TCP"},
                          {"containerPort": 9090}]},
                {"name": "sidecar", "image": "proxy:1",
                "ports": [{"name": "dns", "containerPort": 53, "protocol": "UDP"}]}]
        },
        "status": {
            "phase": "Running", "hostIP": "192.168.0.10", "podIP": ip,
            "podIPs": [{"ip": ip}, {"ip": "fd00::1"}],
            "conditions": [{"type": "Ready", "status": "True"}],
            "containerStatuses": [{"name": "main", "ready": true, "restartCount": 0,
                "state": {"running": {"startedAt": "2025-11-20T09:00:03Z"}}}]
        }
    })
}

#[test]
fn a_served_pod_keeps_only_what_policy_reads() {
    let read: Pod = serde_json::from_value(served_pod("web-1", "web", "10.0.0.1")).unwrap();
    assert_eq!(read.metadata.resource_version.as_deref(), Some("4711"));
    assert!(read.metadata.managed_fields.is_none());
    assert!(read.metadata.annotations.is_none());
    assert!(read.metadata.owner_references.is_none());
    assert!(read.metadata.generate_name.is_none());

    let mut label_sets = LabelSets::default();
    let pod = objects::pod(read, &mut label_sets).unwrap();
    assert_eq!(
        pod,
        state::Pod {
            namespace: "shop".into(),
            name: "web-1".into(),
            labels: Arc::new(
                [("app", "web"), ("pod-template-hash", "7d9f8c6b5")]
                    .map(|(k, v)| (k.to_owned(), v.to_owned()))
                    .into()
            ),
            node_name: Some("node-1".into()),
            host_network: false,
            phase: PodPhase::Running,
            ips: vec!["10.0.0.1".parse().unwrap(), "fd00::1".parse().unwrap()],
            named_ports: vec![
                NamedPort {
                    name: "http".into(),
                    protocol: Protocol::Tcp,
                    port: 8080
                },
                NamedPort {
                    name: "dns".into(),
                    protocol: Protocol::Udp,
                    port: 53
                },
            ],
            uid: "uid-web-1".into(),
        }
    );
}

#[test]
fn replicas_share_one_label_map() {
    let mut label_sets = LabelSets::default();
    let mut read = |name: &str, app: &str, ip: &str| {
        let pod: Pod = serde_json::from_value(served_pod(name, app, ip)).unwrap();
        objects::pod(pod, &mut label_sets).unwrap()
    };
    let first = read("web-1", "web", "10.0.0.1");
    let second = read("web-2", "web", "10.0.0.2");
    let other = read("db-1", "db", "10.0.0.3");
    assert!(Arc::ptr_eq(&first.labels, &second.labels));
    assert!(!Arc::ptr_eq(&first.labels, &other.labels));
    assert_eq!(other.labels["app"], "db");
    assert_eq!(label_sets.len(), 2);
}

#[test]
fn a_field_of_the_wrong_type_is_named() {
    let mut pod = served_pod("web-1", "web", "10.0.0.1");
    pod["spec"]["containers"][0]["ports"][0]["containerPort"] = json!("eighty");
    let error = serde_path_to_error::deserialize::<_, Pod>(pod).unwrap_err();
    assert_eq!(
        error.path().to_string(),
        "spec.containers[0].ports[0].containerPort"
    );
    // What Egret does not read cannot be wrong.
    let mut pod = served_pod("web-1", "web", "10.0.0.1");
    pod["spec"]["restartPolicy"] = json!(42);
    pod["metadata"]["annotations"] = json!(["not", "a", "map"]);
    assert!(serde_json::from_value::<Pod>(pod).is_ok());
}

#[test]
fn trimmed_kinds_are_listed_where_the_full_ones_are() {
    assert_eq!(Namespace::url_path(&(), None), "/api/v1/namespaces");
    assert_eq!(Pod::url_path(&(), None), "/api/v1/pods");
    assert_eq!(Service::url_path(&(), None), "/api/v1/services");
    assert_eq!(
        EndpointSlice::url_path(&(), None),
        "/apis/discovery.k8s.io/v1/endpointslices"
    );
    assert_eq!(
        NetworkPolicy::url_path(&(), None),
        "/apis/networking.k8s.io/v1/networkpolicies"
    );
    assert_eq!(Pod::api_version(&()), "v1");
    assert_eq!(EndpointSlice::api_version(&()), "discovery.k8s.io/v1");
}

#[test]
fn services_and_endpoint_slices_read_as_served() {
    let service: Service = serde_json::from_value(json!({
        "metadata": {"name": "api", "namespace": "shop", "managedFields": []},
        "spec": {"clusterIP": "10.96.0.10", "clusterIPs": ["10.96.0.10", "fd00:96::10"],
            "externalIPs": ["192.0.2.1"], "type": "LoadBalancer", "sessionAffinity": "None",
            "ports": [{"name": "http", "port": 80, "targetPort": 8080, "protocol": "TCP"}]},
        "status": {"loadBalancer": {"ingress": [{"ip": "198.51.100.7"}, {"hostname": "lb.example"}]}}
    }))
    .unwrap();
    let service = objects::service(service).unwrap();
    assert_eq!(
        service.virtual_ips,
        ["10.96.0.10", "fd00:96::10", "192.0.2.1", "198.51.100.7"]
            .map(|ip| ip.parse::<std::net::IpAddr>().unwrap())
    );
    assert_eq!(service.ports.len(), 1);

    let slice: EndpointSlice = serde_json::from_value(json!({
        "metadata": {"name": "api-x1", "namespace": "shop",
            "labels": {"kubernetes.io/service-name": "api", "endpointslice.kubernetes.io/managed-by": "x"}},
        "addressType": "IPv4",
        "ports": [{"name": "http", "port": 8080, "protocol": "TCP"}],
        "endpoints": [
            {"addresses": ["10.0.0.1"], "conditions": {"ready": true}, "nodeName": "node-1",
             "targetRef": {"kind": "Pod", "name": "api-1", "namespace": "shop"}},
            {"addresses": ["10.0.0.2"], "conditions": {"ready": false}}
        ]
    }))
    .unwrap();
    let slice = objects::endpoint_slice(slice).unwrap();
    assert_eq!(slice.service, "api");
    assert_eq!(
        slice.ready_addresses,
        ["10.0.0.1".parse::<std::net::IpAddr>().unwrap()]
    );
}
