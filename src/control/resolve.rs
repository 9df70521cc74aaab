//! The DNS resolver thread: one control-plane thread running a tokio current-thread runtime with
//! one hickory resolver; it answers [`Query`]s with [`Answer`]s over channels, so the control
//! thread never blocks on the network and no worker ever sees DNS.
//!
//! Owns the network side of discovery (which records are asked for, what an answer means:
//! addresses, empty, or failed). Must not: touch snapshots or listener state (`dns.rs` does),
//! or cache on its own (ringlb schedules every query itself; hickory's cache is capped at 0s).

use crate::config::{Discovery, DnsConfig, RecordKind};
use hickory_resolver::config::{LookupIpStrategy, NameServerConfig, ResolverConfig, ResolverOpts};
use hickory_resolver::name_server::TokioConnectionProvider;
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::xfer::Protocol;
use hickory_resolver::proto::ProtoErrorKind;
use hickory_resolver::{ResolveError, TokioResolver};
use std::net::{IpAddr, SocketAddr};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// One resolution to run. `id` comes back in the answer.
#[derive(Debug, Clone)]
pub struct Query {
    pub id: u64,
    pub name: String,
    pub kind: RecordKind,
    pub port: u16,
}

/// One address a name yielded: the weight (SRV's, or 1) and the SRV priority (0 otherwise).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Found {
    pub address: SocketAddr,
    pub weight: u32,
    pub priority: u16,
}

/// What a resolution found.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// At least one address; `ttl`: the shortest TTL of the records used.
    Found { found: Vec<Found>, ttl: Duration },
    /// The name exists but has no such records, or does not exist (NXDOMAIN).
    Empty(String),
    /// No usable answer (SERVFAIL, REFUSED, timeout, network error): the last good set stays.
    Failed(String),
}

impl Outcome {
    /// The `result` label of `ringlb_dns_resolutions_total`.
    pub fn label(&self) -> &'static str {
        match self {
            Outcome::Found { .. } => "ok",
            Outcome::Empty(_) => "empty",
            Outcome::Failed(_) => "failed",
        }
    }
}

#[derive(Debug)]
pub struct Answer {
    pub id: u64,
    pub outcome: Outcome,
}

/// A query's deadline: a resolver that does not answer within it counts as failed.
const QUERY_TIMEOUT: Duration = Duration::from_secs(4);

/// Builds the resolver from `[dns]` (its servers, or `/etc/resolv.conf`'s).
fn resolver(dns: &DnsConfig) -> Result<TokioResolver, String> {
    let provider = TokioConnectionProvider::default();
    let mut builder = match &dns.resolvers {
        Some(servers) => {
            let mut config = ResolverConfig::new();
            for &s in servers {
                config.add_name_server(NameServerConfig::new(s, Protocol::Udp));
                config.add_name_server(NameServerConfig::new(s, Protocol::Tcp));
            }
            TokioResolver::builder_with_config(config, provider)
        }
        None => TokioResolver::builder(provider)
            .map_err(|e| format!("cannot read /etc/resolv.conf: {e}"))?,
    };
    let opts: &mut ResolverOpts = builder.options_mut();
    opts.timeout = Duration::from_secs(2);
    opts.attempts = 1;
    opts.ip_strategy = LookupIpStrategy::Ipv4AndIpv6;
    // ringlb decides when to ask again (refresh / TTL): a cached answer would hide a change.
    opts.positive_max_ttl = Some(Duration::ZERO);
    opts.negative_max_ttl = Some(Duration::ZERO);
    opts.cache_size = 0;
    Ok(builder.build())
}

fn classify(e: &ResolveError) -> Outcome {
    let code = e.proto().and_then(|p| match p.kind() {
        ProtoErrorKind::NoRecordsFound { response_code, .. } => Some(*response_code),
        _ => None,
    });
    match code {
        Some(ResponseCode::NXDomain) => Outcome::Empty("the name does not exist (NXDOMAIN)".into()),
        Some(ResponseCode::NoError) => Outcome::Empty("no records of that type".into()),
        Some(code) => Outcome::Failed(format!("the server answered {code}")),
        None => Outcome::Failed(e.to_string()),
    }
}

fn ttl_of(valid_until: Instant) -> Duration {
    valid_until.saturating_duration_since(Instant::now())
}

async fn addresses(
    r: &TokioResolver,
    name: &str,
    kind: RecordKind,
) -> Result<(Vec<IpAddr>, Duration), ResolveError> {
    Ok(match kind {
        RecordKind::A => {
            let l = r.ipv4_lookup(name).await?;
            (
                l.iter().map(|a| IpAddr::V4(a.0)).collect(),
                ttl_of(l.valid_until()),
            )
        }
        RecordKind::Aaaa => {
            let l = r.ipv6_lookup(name).await?;
            (
                l.iter().map(|a| IpAddr::V6(a.0)).collect(),
                ttl_of(l.valid_until()),
            )
        }
        RecordKind::Host | RecordKind::Srv => {
            let l = r.lookup_ip(name).await?;
            (l.iter().collect(), ttl_of(l.valid_until()))
        }
    })
}

async fn run_query(r: &TokioResolver, q: &Query) -> Outcome {
    let lookup = async {
        if q.kind != RecordKind::Srv {
            let (ips, ttl) = match addresses(r, &q.name, q.kind).await {
                Ok(v) => v,
                Err(e) => return classify(&e),
            };
            let found = ips
                .into_iter()
                .map(|ip| Found {
                    address: SocketAddr::new(ip, q.port),
                    weight: 1,
                    priority: 0,
                })
                .collect::<Vec<_>>();
            return finish(found, ttl);
        }
        let srv = match r.srv_lookup(q.name.as_str()).await {
            Ok(s) => s,
            Err(e) => return classify(&e),
        };
        let mut ttl = ttl_of(srv.as_lookup().valid_until());
        let mut found = Vec::new();
        for rec in srv.iter() {
            let target = rec.target().to_utf8();
            // "." : the service is decidedly not available at this name (RFC 2782).
            if target == "." || rec.port() == 0 {
                continue;
            }
            // A target that does not resolve fails the whole answer: a partial set would
            // remove healthy backends because of one bad record.
            let (ips, t) = match addresses(r, &target, RecordKind::Host).await {
                Ok(v) => v,
                Err(e) => {
                    return match classify(&e) {
                        Outcome::Empty(why) | Outcome::Failed(why) => {
                            Outcome::Failed(format!("SRV target {target}: {why}"))
                        }
                        other => other,
                    }
                }
            };
            ttl = ttl.min(t);
            for ip in ips {
                found.push(Found {
                    address: SocketAddr::new(ip, rec.port()),
                    // RFC 2782: weight 0 is "very rarely", not never; ringlb's 0 is "drained".
                    weight: u32::from(rec.weight()).max(1),
                    priority: rec.priority(),
                });
            }
        }
        finish(found, ttl)
    };
    match tokio::time::timeout(QUERY_TIMEOUT, lookup).await {
        Ok(o) => o,
        Err(_) => Outcome::Failed(format!("no answer within {}s", QUERY_TIMEOUT.as_secs())),
    }
}

fn finish(mut found: Vec<Found>, ttl: Duration) -> Outcome {
    if found.is_empty() {
        return Outcome::Empty("no usable records".into());
    }
    found.sort_by_key(|f| f.address);
    found.dedup_by_key(|f| f.address);
    Outcome::Found { found, ttl }
}

/// The handle the control thread holds: send queries, collect answers.
pub struct ResolverThread {
    queries: tokio::sync::mpsc::UnboundedSender<Query>,
    pub answers: mpsc::Receiver<Answer>,
}

impl ResolverThread {
    /// Starts the thread. Fails only if the resolver cannot be configured or the thread not
    /// spawned.
    pub fn start(dns: &DnsConfig) -> Result<ResolverThread, String> {
        let (qtx, mut qrx) = tokio::sync::mpsc::unbounded_channel::<Query>();
        let (atx, arx) = mpsc::channel::<Answer>();
        let dns = dns.clone();
        let (ready_tx, ready_rx) = mpsc::channel::<Result<(), String>>();
        std::thread::Builder::new()
            .name("ringlb-dns".into())
            .spawn(move || {
                let rt = match tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                {
                    Ok(rt) => rt,
                    Err(e) => {
                        let _ = ready_tx.send(Err(format!("dns runtime: {e}")));
                        return;
                    }
                };
                rt.block_on(async move {
                    let r = match resolver(&dns) {
                        Ok(r) => std::rc::Rc::new(r),
                        Err(e) => {
                            let _ = ready_tx.send(Err(e));
                            return;
                        }
                    };
                    let _ = ready_tx.send(Ok(()));
                    let local = tokio::task::LocalSet::new();
                    local
                        .run_until(async move {
                            // Ends when the control plane drops its sender.
                            while let Some(q) = qrx.recv().await {
                                let (r, atx) = (r.clone(), atx.clone());
                                tokio::task::spawn_local(async move {
                                    let outcome = run_query(&r, &q).await;
                                    let _ = atx.send(Answer { id: q.id, outcome });
                                });
                            }
                        })
                        .await;
                });
            })
            .map_err(|e| format!("cannot start the dns thread: {e}"))?;
        ready_rx
            .recv()
            .map_err(|_| "the dns thread ended at start".to_string())??;
        Ok(ResolverThread {
            queries: qtx,
            answers: arx,
        })
    }

    pub fn send(&self, q: Query) {
        let _ = self.queries.send(q);
    }
}

/// Resolves every name once, in parallel, waiting at most [`QUERY_TIMEOUT`] and a bit: what
/// `ringlb check` prints.
pub fn resolve_all(dns: &DnsConfig, names: &[&Discovery]) -> Result<Vec<Outcome>, String> {
    let thread = ResolverThread::start(dns)?;
    for (i, d) in names.iter().enumerate() {
        thread.send(Query {
            id: i as u64,
            name: d.name.clone(),
            kind: d.kind,
            port: d.port,
        });
    }
    let mut out: Vec<Option<Outcome>> = vec![None; names.len()];
    let deadline = Instant::now() + QUERY_TIMEOUT + Duration::from_secs(1);
    while out.iter().any(Option::is_none) {
        let left = deadline.saturating_duration_since(Instant::now());
        match thread.answers.recv_timeout(left) {
            Ok(a) => {
                if let Some(slot) = out.get_mut(a.id as usize) {
                    *slot = Some(a.outcome);
                }
            }
            Err(_) => break,
        }
    }
    Ok(out
        .into_iter()
        .map(|o| o.unwrap_or_else(|| Outcome::Failed("no answer in time".into())))
        .collect())
}
