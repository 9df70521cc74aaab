//! The route table: the order rules of `route.rs`, wildcards, case, defaults, and the errors
//! the config layer shows.

use super::*;

fn route(sni: &[&str], alpn: &[&str], pool: usize) -> Route {
    Route {
        sni: sni.iter().map(|s| s.to_string()).collect(),
        alpn: alpn.iter().map(|s| s.to_string()).collect(),
        pool,
    }
}

fn hello(sni: Option<&str>, alpn: &[&str]) -> Hello {
    Hello {
        sni: sni.map(String::from),
        alpn: alpn.iter().map(|a| a.as_bytes().to_vec()).collect(),
        ..Hello::default()
    }
}

fn table(routes: &[Route], default: Option<usize>) -> RouteTable {
    RouteTable::build(routes, default).unwrap()
}

fn go(t: &RouteTable, sni: Option<&str>, alpn: &[&str]) -> Option<usize> {
    t.lookup(Some(&hello(sni, alpn)))
}

#[test]
fn the_issue_example_routes_as_documented() {
    // routes = [{ sni = ["api.example.com"], pool = "api" },
    //           { sni = ["*.example.com"], alpn = ["h2"], pool = "web-h2" },
    //           { default = true, pool = "web" }]
    let (api, web_h2, web) = (0, 1, 2);
    let t = table(
        &[
            route(&["api.example.com"], &[], api),
            route(&["*.example.com"], &["h2"], web_h2),
        ],
        Some(web),
    );
    assert!(t.needs_inspect());
    assert_eq!(go(&t, Some("api.example.com"), &["h2"]), Some(api));
    assert_eq!(
        go(&t, Some("www.example.com"), &["h2", "http/1.1"]),
        Some(web_h2)
    );
    assert_eq!(go(&t, Some("www.example.com"), &["http/1.1"]), Some(web));
    assert_eq!(go(&t, Some("example.com"), &["h2"]), Some(web));
    assert_eq!(go(&t, Some("a.b.example.com"), &["h2"]), Some(web));
    assert_eq!(go(&t, None, &["h2"]), Some(web));
    assert_eq!(t.lookup(None), Some(web));
}

#[test]
fn exact_beats_wildcard_beats_any_name_whatever_the_order() {
    let t = table(
        &[
            route(&[], &["h2"], 30),
            route(&["*.example.com"], &[], 20),
            route(&["www.example.com"], &[], 10),
        ],
        None,
    );
    assert_eq!(go(&t, Some("www.example.com"), &["h2"]), Some(10));
    assert_eq!(go(&t, Some("mail.example.com"), &["h2"]), Some(20));
    assert_eq!(go(&t, Some("other.test"), &["h2"]), Some(30));
    assert_eq!(go(&t, None, &["h2"]), Some(30));
    assert_eq!(go(&t, Some("other.test"), &["http/1.1"]), None);
    assert_eq!(t.lookup(None), None);
}

#[test]
fn within_a_level_an_alpn_match_beats_no_condition_then_file_order() {
    let t = table(
        &[
            route(&["a.example"], &[], 1),
            route(&["a.example"], &["h2"], 2),
            route(&["a.example"], &["http/1.1", "h2c"], 3),
            route(&["*.example"], &["h2"], 4),
        ],
        Some(0),
    );
    assert_eq!(go(&t, Some("a.example"), &["h2"]), Some(2));
    assert_eq!(go(&t, Some("a.example"), &["http/1.1", "h2"]), Some(2));
    assert_eq!(go(&t, Some("a.example"), &["http/1.1"]), Some(3));
    assert_eq!(go(&t, Some("a.example"), &["acme-tls/1"]), Some(1));
    assert_eq!(go(&t, Some("a.example"), &[]), Some(1));
    // The exact level wins even where a wildcard route's ALPN matches too.
    assert_eq!(go(&t, Some("b.example"), &["h2"]), Some(4));
    assert_eq!(go(&t, Some("b.example"), &["http/1.1"]), Some(0));
}

#[test]
fn names_match_case_insensitively_alpn_exactly() {
    let t = table(
        &[
            route(&["API.Example.COM."], &[], 1),
            route(&["*.Web.Example"], &["h2"], 2),
        ],
        None,
    );
    assert_eq!(go(&t, Some("api.example.com"), &[]), Some(1));
    // A hand-built Hello with capitals still matches (the parser always lowercases).
    assert_eq!(go(&t, Some("API.EXAMPLE.com"), &[]), Some(1));
    assert_eq!(go(&t, Some("X.WEB.example"), &["h2"]), Some(2));
    assert_eq!(go(&t, Some("x.web.example"), &["H2"]), None);
}

#[test]
fn without_routes_nothing_is_inspected() {
    let t = table(&[], Some(7));
    assert!(!t.needs_inspect());
    assert_eq!(t.default_pool(), Some(7));
    assert_eq!(t.lookup(None), Some(7));
    assert_eq!(go(&t, Some("a.example"), &["h2"]), Some(7));
}

#[test]
fn ech_hellos_route_by_their_outer_name() {
    let t = table(&[route(&["public.example"], &[], 1)], Some(0));
    let h = Hello {
        ech: true,
        ..hello(Some("public.example"), &[])
    };
    assert_eq!(t.lookup(Some(&h)), Some(1));
}

fn build_err(routes: &[Route]) -> String {
    RouteTable::build(routes, Some(0)).unwrap_err().to_string()
}

#[test]
fn bad_patterns_are_refused_with_route_field_and_value() {
    let e = RouteTable::build(
        &[
            route(&["ok.example"], &[], 1),
            route(&["x.example", "a.*.com"], &[], 2),
        ],
        None,
    )
    .unwrap_err();
    assert_eq!((e.route, e.field), (1, RouteField::Sni));
    assert_eq!(e.field_path(), "routes[1].sni");
    assert!(
        e.problem()
            .starts_with("\"a.*.com\": '*' is allowed only as the whole leftmost label"),
        "{e}"
    );
    for (bad, why) in [
        ("*", "'*' alone"),
        ("*a.example.com", "'*' is allowed only"),
        ("*.*.example.com", "'*' is allowed only"),
        ("", "empty name"),
        ("*.", "empty name"),
        ("a..example", "empty label"),
        ("bücher.example", "not ASCII"),
        ("10.1.2.3", "an IP address"),
        ("a b", "a host name holds only"),
        ("-a.example", "starts or ends with '-'"),
    ] {
        let msg = build_err(&[route(&[bad], &[], 1)]);
        assert!(
            msg.starts_with(&format!("routes[0].sni: {bad:?}: ")),
            "{bad}: {msg}"
        );
        assert!(msg.contains(why), "{bad}: {msg}");
    }
    for (bad, why) in [("", "1 to 255 bytes"), ("h 2", "printable ASCII")] {
        let msg = build_err(&[route(&["a.example"], &[bad], 1)]);
        assert!(
            msg.starts_with(&format!("routes[0].alpn: {bad:?}: ")),
            "{msg}"
        );
        assert!(msg.contains(why), "{msg}");
    }
    let long = "x".repeat(256);
    assert!(build_err(&[route(&[], &[&long], 1)]).contains("1 to 255 bytes"));
    let msg = build_err(&[route(&[], &[], 1)]);
    assert!(
        msg.starts_with("routes[0]: a route needs \"sni\" or \"alpn\""),
        "{msg}"
    );
}

#[test]
fn a_route_an_earlier_one_makes_unreachable_is_refused() {
    let msg = build_err(&[
        route(&["a.example", "b.example"], &[], 1),
        route(&["c.example", "B.example"], &[], 2),
    ]);
    assert!(
        msg.starts_with("routes[1].sni: \"B.example\": routes[0] already takes"),
        "{msg}"
    );
    let msg = build_err(&[
        route(&["*.example"], &["h2", "http/1.1"], 1),
        route(&["*.example"], &["h2"], 2),
    ]);
    assert!(
        msg.starts_with("routes[1].sni: \"*.example\": routes[0]"),
        "{msg}"
    );
    let msg = build_err(&[route(&[], &["h2"], 1), route(&[], &["h2"], 2)]);
    assert!(
        msg.starts_with("routes[1].alpn: \"h2\": routes[0]"),
        "{msg}"
    );
    // Reachable overlaps are fine: an ALPN route after a plain one, a wider ALPN list after a
    // narrower one, the same suffix as exact name and as wildcard, a name repeated in a route.
    table(
        &[
            route(&["a.example"], &[], 1),
            route(&["a.example"], &["h2"], 2),
        ],
        None,
    );
    table(
        &[
            route(&["a.example"], &["h2"], 1),
            route(&["a.example"], &["h2", "h3"], 2),
        ],
        None,
    );
    table(
        &[
            route(&["a.example"], &[], 1),
            route(&["*.a.example"], &[], 2),
            route(&["*.example"], &[], 3),
        ],
        None,
    );
    table(&[route(&["a.example", "A.example."], &[], 1)], None);
}
