//! UDP flows across a binary upgrade: the old process's workers give their flows away (client,
//! listener, backend and a duplicate of the connected upstream socket), the new process's
//! workers take them in, so a client keeps its backend and its upstream source port whatever
//! the balancing policy. Must not: read or write a datagram (the sockets' queued datagrams stay
//! in the kernel for whichever process polls next). What the old worker had already taken when
//! it handed over (a ring-received reply, a client datagram) still goes on, in `udp.rs`.

use super::{Flow, FlowSlot, NIL};
use crate::io::{Driver, Op, Token};
use crate::worker::{HandedFlow, Worker};
use log::debug;
use std::os::fd::{AsFd, AsRawFd};

impl Worker {
    /// Gives every open flow away: a duplicate of its upstream socket goes into the answer and
    /// the flow closes here (its poll is cancelled; the socket itself lives on in the new
    /// process). Receiving on the UDP listeners stops first (the runtime set DRAIN).
    pub(in crate::worker) fn export_flows(&mut self) -> Vec<HandedFlow> {
        self.check_stop();
        let mut out = Vec::new();
        for idx in 0..self.flows.slots.len() as u32 {
            let Some(f) = self.flows.slots[idx as usize].flow.as_ref() else {
                continue;
            };
            if f.closing {
                continue;
            }
            let (Ok(socket), Ok(kept)) = (
                f.socket.as_fd().try_clone_to_owned(),
                f.socket.as_fd().try_clone_to_owned(),
            ) else {
                continue;
            };
            out.push(HandedFlow {
                listener: self.listeners[f.listener as usize].name.clone(),
                client: f.client,
                local: f.local,
                backend: f.member.address,
                socket,
            });
            let key = (f.listener, f.client);
            self.flows.handed.insert(key, (kept, f.member.clone()));
            if let Some(f) = self.flows.slots[idx as usize].flow.as_mut() {
                f.handed = true;
            }
            self.close_flow(idx);
        }
        debug!("worker {}: {} UDP flow(s) handed over", self.id, out.len());
        out
    }

    /// Takes in flows a previous process handed over, then starts receiving on the UDP
    /// listeners that waited for them. A flow whose listener or backend this config does not
    /// have is dropped (that client's next datagram picks a backend again).
    pub(in crate::worker) fn adopt_flows(&mut self, flows: Vec<HandedFlow>) {
        let mut taken = 0usize;
        for hf in flows {
            let Some(li) = self.listeners.iter().position(|l| {
                l.udp.is_some() && l.removed_at_ms.is_none() && l.name == hf.listener
            }) else {
                continue;
            };
            if self.flows.map.contains_key(&(li as u32, hf.client)) {
                continue;
            }
            let snap = self.listeners[li].reader.load();
            let Some(m) = snap.members().find(|m| m.address == hf.backend) else {
                continue;
            };
            let stats = m.stats.clone();
            stats.inc_active();
            crate::backend::bump(&self.listeners[li].stats.worker(self.id).udp_flows, 1);
            let fd = hf.socket.as_raw_fd();
            let flow = Flow {
                listener: li as u32,
                client: hf.client,
                local: hf.local,
                socket: hf.socket,
                member: stats,
                last_active_ms: self.now_ms,
                prev: NIL,
                next: NIL,
                inflight: 1,
                closing: false,
                handed: false,
            };
            let idx = match self.flows.free.pop() {
                Some(i) => {
                    self.flows.slots[i as usize].flow = Some(flow);
                    i
                }
                None => {
                    self.flows.slots.push(FlowSlot {
                        generation: 0,
                        flow: Some(flow),
                    });
                    (self.flows.slots.len() - 1) as u32
                }
            };
            self.flows.map.insert((li as u32, hf.client), idx);
            if let Some(u) = self.listeners[li].udp.as_mut() {
                u.flows += 1;
            }
            self.link_front(idx);
            let generation = self.flows.slots[idx as usize].generation;
            self.io.poll_multi(
                fd,
                libc::POLLIN as u32,
                Token::new(Op::UdpPoll, idx, generation),
            );
            taken += 1;
        }
        debug!("worker {}: {taken} UDP flow(s) taken over", self.id);
        for li in 0..self.listeners.len() {
            if self.listeners[li].hold_udp {
                self.listeners[li].hold_udp = false;
                self.arm_accept(li);
            }
        }
    }
}
