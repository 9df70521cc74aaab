//! Tests of backend pools and TLS passthrough routing in the config: the implicit pool, named
//! pools, routes, `tls_inspect`, and one message per kind of mistake (naming the listener, the
//! field and the value).

use super::tests::{error, parse};
use super::*;

/// A tcp listener "tls" with `body` after its bind.
fn tls(body: &str) -> String {
    format!("[[listeners]]\nname = \"tls\"\nbind = \"127.0.0.1:0\"\n{body}\n")
}

const POOLS: &str = "[[listeners.pools]]\nname = \"api\"\nbalance = \"least_connections\"\nbackends = [{ address = \"127.0.0.1:9001\" }]\n\
                     [[listeners.pools]]\nname = \"web\"\nbackends = [{ address = \"127.0.0.1:9002\" }, { address = \"127.0.0.1:9003\" }]\n";

fn routed(routes: &str) -> String {
    tls(&format!("routes = [{routes}]\n{POOLS}"))
}

#[test]
fn the_backends_of_a_listener_are_its_implicit_pool() {
    let l = parse(&tls("backends = [{ address = \"127.0.0.1:9001\" }]"));
    assert_eq!(l.pools.len(), 1);
    assert_eq!(l.pools[0].name, IMPLICIT_POOL);
    assert_eq!(l.routing, None);
    assert_eq!(l.default_pool().map(|p| p.name.as_str()), Some("default"));
}

#[test]
fn named_pools_and_routes_compile_in_file_order() {
    let l = parse(&routed(
        "{ sni = [\"API.example.com\"], pool = \"api\" }, { default = true, pool = \"web\" }",
    ));
    let names: Vec<&str> = l.pools.iter().map(|p| p.name.as_str()).collect();
    assert_eq!(names, ["api", "web"]);
    assert_eq!(l.pools[0].balance, crate::balance::Policy::LeastConnections);
    assert_eq!(l.pools[1].backends.len(), 2);
    let r = l.routing.as_ref().expect("routing");
    assert_eq!(r.timeout, DEFAULT_TLS_INSPECT_TIMEOUT);
    assert_eq!(r.max_bytes, DEFAULT_TLS_INSPECT_MAX_BYTES);
    assert!(r.inspects());
    assert_eq!(r.table.default_pool(), Some(1));
    assert_eq!(r.routes.len(), 1);
    assert_eq!(r.routes[0].pool, 0);
    assert_eq!(
        l.pool_units()
            .iter()
            .map(|u| u.name.as_str())
            .collect::<Vec<_>>(),
        ["tls/api", "tls/web"]
    );
    assert_eq!(split_pool_key("tls/api"), ("tls", "api"));
    assert_eq!(split_pool_key("tls"), ("tls", "default"));
}

#[test]
fn the_implicit_pool_can_be_routed_to_and_tls_inspect_is_read() {
    let l = parse(&tls(&format!(
        "backends = [{{ address = \"127.0.0.1:9009\" }}]\ntls_inspect = {{ timeout = \"250ms\", max_bytes = 4096 }}\n\
         routes = [{{ alpn = [\"h2\"], pool = \"api\" }}, {{ default = true, pool = \"default\" }}, {{ sni = [\"*.a.example\"], pool = \"web\" }}]\n{POOLS}"
    )));
    assert_eq!(l.pools.len(), 3);
    let r = l.routing.as_ref().unwrap();
    assert_eq!(r.timeout, Duration::from_millis(250));
    assert_eq!(r.max_bytes, 4096);
    assert_eq!(r.table.default_pool(), Some(0));
}

#[test]
fn only_a_default_route_never_inspects() {
    let l = parse(&tls(
        "backends = [{ address = \"127.0.0.1:9001\" }]\nroutes = [{ default = true, pool = \"default\" }]",
    ));
    assert!(!l.routing.as_ref().unwrap().inspects());
}

#[test]
fn mistakes_name_the_listener_the_field_and_the_value() {
    let cases: Vec<(String, &[&str])> = vec![
        (
            routed("{ sni = [\"a.example\"], pool = \"nope\" }, { default = true, pool = \"web\" }"),
            &["listener \"tls\"", "field \"routes[0].pool\"", "\"nope\" is not a pool", "\"api\", \"web\""],
        ),
        (
            tls("routes = [{ default = true, pool = \"x\" }]\n[[listeners.pools]]\nname = \"x\"\nbackends = [{ address = \"127.0.0.1:1\" }]\n[[listeners.pools]]\nname = \"x\"\nbackends = [{ address = \"127.0.0.1:2\" }]"),
            &["field \"pools[1].name\"", "\"x\" is already used by pools[0]"],
        ),
        (
            tls(POOLS),
            &["field \"pools\"", "routes is not"],
        ),
        (
            routed("{ sni = [\"a.example\"], pool = \"api\" }"),
            &["field \"pools[1].name\"", "pool \"web\" is named by no route"],
        ),
        (
            routed("{ default = true, pool = \"api\" }, { default = true, pool = \"web\" }"),
            &["field \"routes[1].default\"", "routes[0] is already the default route"],
        ),
        (
            routed("{ default = true, sni = [\"a.example\"], pool = \"api\" }, { alpn = [\"h2\"], pool = \"web\" }"),
            &["field \"routes[0].default\"", "no sni"],
        ),
        (
            routed("{ pool = \"api\" }, { default = true, pool = \"web\" }"),
            &["field \"routes[0]\"", "needs \"sni\" or \"alpn\""],
        ),
        (
            routed("{ default = true, pool = \"web\" }, { sni = [\"a.*.example\"], pool = \"api\" }"),
            &["field \"routes[1].sni\"", "\"a.*.example\""],
        ),
        (
            routed("{ sni = [\"a.example\"] }, { default = true, pool = \"web\" }"),
            &["field \"routes[0].pool\"", "missing"],
        ),
        (
            routed("{ sni = [\"a.example\"], pool = \"api\" }, { default = true, pool = \"web\" }]\ntls_inspect = { max_bytes = 10 }\n#["),
            &["field \"tls_inspect.max_bytes\"", "10 must be between 50"],
        ),
        (
            routed("{ sni = [\"a.example\"], pool = \"api\" }, { default = true, pool = \"web\" }]\ntls_inspect = { timeout = \"0s\" }\n#["),
            &["field \"tls_inspect.timeout\"", "\"0s\" must be greater than zero"],
        ),
        (
            tls(&format!("balance = \"maglev\"\nroutes = [{{ default = true, pool = \"api\" }}, {{ sni = [\"w.example\"], pool = \"web\" }}]\n{POOLS}")),
            &["field \"balance\"", "no backends of its own"],
        ),
        (
            tls("backends = [{ address = \"127.0.0.1:1\" }]\nroutes = [{ default = true, pool = \"default\" }]\n[[listeners.pools]]\nname = \"default\"\nbackends = [{ address = \"127.0.0.1:2\" }]"),
            &["field \"pools[0].name\"", "implicit pool"],
        ),
        (
            routed("{ sni = [\"a.example\"], pool = \"api\" }, { default = true, pool = \"web\" }]\n[[listeners.pools]]\nname = \"bad\"\nbalance = \"fastest\"\nbackends = [{ address = \"127.0.0.1:5\" }]\n#["),
            &["listener \"tls\", pool \"bad\"", "field \"balance\"", "\"fastest\""],
        ),
        (
            tls("protocol = \"udp\"\nbackends = [{ address = \"127.0.0.1:1\" }]\nroutes = [{ default = true, pool = \"default\" }]\n[listeners.health]\nsend = \"x\"\nexpect = \"y\""),
            &["field \"routes\"", "tcp listeners only"],
        ),
        (
            tls("backends = [{ address = \"127.0.0.1:1\" }]\ntls_inspect = { timeout = \"1s\" }"),
            &["field \"tls_inspect\"", "routes is not"],
        ),
    ];
    for (text, wants) in cases {
        let e = error(&text);
        for w in wants {
            assert!(e.contains(w), "{e:?} lacks {w:?}\n{text}");
        }
    }
}
