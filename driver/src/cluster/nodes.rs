//! The nodes the controller places volumes on: how to reach each one's
//! agent, which are alive, and which one a new volume goes to.
//!
//! A node is known by its [`NodeRecord`]. The heartbeat ([`Nodes::run`])
//! asks every known agent for `NodeInfo` at a fixed interval and writes
//! what it answered (room, version) into the record; a node that has not
//! answered for `stale_after` is marked stale, gets no new volumes, and
//! calls for its volumes fail with UNAVAILABLE until it answers again.
//! Agents are known from `--node-agent` addresses (the embedded store) or
//! from the records the nodes write themselves; standalone mode has one
//! node, in process.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use csi_proto::agent::v1::agent_server::Agent;
use csi_proto::agent::v1::{NodeInfoReply, NodeInfoRequest};
use tonic::{Request, Status};

use super::records::{NodeRecord, NodeState, Records};
use crate::agent::client::RemoteAgent;
use crate::tls::Server;
use crate::tls::TlsFiles;

/// How often and how patiently the controller checks on nodes.
#[derive(Debug, Clone)]
pub struct Heartbeat {
    pub interval: Duration,
    pub stale_after: Duration,
}

impl Default for Heartbeat {
    fn default() -> Self {
        Heartbeat {
            interval: Duration::from_secs(10),
            stale_after: Duration::from_secs(30),
        }
    }
}

/// The registry of nodes and their agents.
pub struct Nodes {
    records: Arc<dyn Records>,
    /// The node of this very process (standalone), called without network.
    local: Option<(String, Arc<dyn Agent>)>,
    tls: Option<TlsFiles>,
    /// Addresses to ask even before any record names them.
    seeds: Vec<String>,
    /// Agents by address and the name their certificate must carry.
    remotes: Mutex<HashMap<(String, String), Arc<dyn Agent>>>,
    /// Agent addresses (and the node name checked there) a heartbeat
    /// question is still out for.
    asking: Mutex<std::collections::HashSet<(String, String)>>,
    /// The node records as of the last heartbeat (or load): placement and
    /// routing read these, never the store, so they never block.
    cache: Mutex<HashMap<String, NodeRecord>>,
    /// Nodes whose last write to the store failed: written again at the
    /// next round even if nothing changed.
    unsaved: Mutex<std::collections::HashSet<String>>,
    /// Whether the cache was read from the store once: before, a node
    /// missing from it may only not be loaded yet.
    loaded: std::sync::atomic::AtomicBool,
    /// Held by a forget across its delete, and by writes that must not
    /// bring a forgotten node's record back (they check it exists first).
    membership: tokio::sync::Mutex<()>,
    /// Thin provisioning: a node takes volumes until their sizes add up
    /// to its capacity times this ratio.
    overcommit: f64,
    heartbeat: Heartbeat,
}

impl std::fmt::Debug for Nodes {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nodes")
            .field("local", &self.local_id())
            .field("seeds", &self.seeds)
            .field("overcommit", &self.overcommit)
            .field("heartbeat", &self.heartbeat)
            .finish_non_exhaustive()
    }
}

pub(crate) fn now_ns() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

fn records_err(e: super::records::RecordsError) -> Status {
    Status::internal(e.to_string())
}

/// What every call but a delete gets for a volume or a snapshot on a node
/// forgotten with what it held (`strata node forget --abandon-data`).
pub fn lost(node: &str) -> Status {
    Status::failed_precondition(format!(
        "node {node} was forgotten (strata node forget --abandon-data): what it held is lost; \
         delete it"
    ))
}

impl Nodes {
    /// Standalone: the one node is this process.
    pub fn local(records: Arc<dyn Records>, node_id: String, agent: Arc<dyn Agent>) -> Self {
        let mut nodes = Nodes::new(records, None, Vec::new(), 1.0, Heartbeat::default());
        nodes.local = Some((node_id, agent));
        nodes
    }

    /// Cluster mode: nodes are reached over mutual TLS.
    pub fn remote(
        records: Arc<dyn Records>,
        tls: TlsFiles,
        seeds: Vec<String>,
        overcommit: f64,
        heartbeat: Heartbeat,
    ) -> Self {
        Nodes::new(records, Some(tls), seeds, overcommit, heartbeat)
    }

    fn new(
        records: Arc<dyn Records>,
        tls: Option<TlsFiles>,
        seeds: Vec<String>,
        overcommit: f64,
        heartbeat: Heartbeat,
    ) -> Self {
        Nodes {
            records,
            local: None,
            tls,
            seeds,
            remotes: Mutex::default(),
            asking: Mutex::default(),
            cache: Mutex::default(),
            unsaved: Mutex::default(),
            loaded: std::sync::atomic::AtomicBool::new(false),
            membership: tokio::sync::Mutex::default(),
            overcommit,
            heartbeat,
        }
    }

    /// The agent at `address`, of node `node` (empty: not known yet),
    /// whose certificate must name it (with a certificate per process).
    fn agent_at(&self, address: &str, node: &str) -> Result<Arc<dyn Agent>, Status> {
        let Some(tls) = &self.tls else {
            return Err(Status::internal(format!(
                "no TLS configuration to reach the agent at {address}"
            )));
        };
        let server = if node.is_empty() {
            Server::Any
        } else {
            Server::Node(node)
        };
        let key = (address.to_string(), tls.server_name_of(server));
        let mut remotes = self.remotes.lock().expect("remotes");
        if let Some(a) = remotes.get(&key) {
            return Ok(Arc::clone(a));
        }
        let agent: Arc<dyn Agent> = Arc::new(RemoteAgent::new(address, server, tls)?);
        remotes.insert(key, Arc::clone(&agent));
        Ok(agent)
    }

    /// The agent of `node_id`, if the node is known and not stale.
    pub fn agent(&self, node_id: &str) -> Result<Arc<dyn Agent>, Status> {
        if let Some((id, agent)) = &self.local
            && id == node_id
        {
            return Ok(Arc::clone(agent));
        }
        let rec = self.cache.lock().expect("nodes").get(node_id).cloned();
        match rec {
            None => Err(Status::unavailable(format!(
                "node {node_id} is not registered; is its strata node plugin running?"
            ))),
            Some(r) if r.state == NodeState::Stale => Err(Status::unavailable(format!(
                "node {node_id} has not answered for {} s ({}); its volumes are unreachable until it is back",
                now_ns().saturating_sub(r.last_seen_unix_ns) / 1_000_000_000,
                r.message
            ))),
            Some(r) => self.agent_at(&r.agent_address, node_id),
        }
    }

    /// Where another node reaches `node_id`'s data path, and the key its
    /// grants are made with: `None` in standalone mode.
    pub fn peer(&self, node_id: &str) -> Result<Option<(String, &TlsFiles)>, Status> {
        let Some(tls) = &self.tls else {
            return Ok(None);
        };
        let rec = self.cache.lock().expect("nodes").get(node_id).cloned();
        match rec {
            Some(r) => Ok(Some((r.agent_address, tls))),
            None => Err(Status::unavailable(format!(
                "node {node_id} is not registered; is its strata node plugin running?"
            ))),
        }
    }

    /// The node of this process, in standalone mode.
    /// Nodes attach each other's volumes (cluster mode, with TLS).
    pub fn attaches_remote(&self) -> bool {
        self.tls.is_some()
    }

    pub fn local_id(&self) -> Option<String> {
        self.local.as_ref().map(|(id, _)| id.clone())
    }

    /// Every node record (refreshed by the heartbeat).
    pub fn list(&self) -> Result<Vec<NodeRecord>, Status> {
        let mut all: Vec<NodeRecord> = self
            .cache
            .lock()
            .expect("nodes")
            .values()
            .cloned()
            .collect();
        all.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        Ok(all)
    }

    /// Runs a records call off the async threads (the store may block).
    async fn store<T: Send + 'static>(
        &self,
        f: impl FnOnce(&dyn Records) -> Result<T, super::records::RecordsError> + Send + 'static,
    ) -> Result<T, Status> {
        let records = Arc::clone(&self.records);
        tokio::task::spawn_blocking(move || f(records.as_ref()).map_err(records_err))
            .await
            .map_err(|e| Status::internal(e.to_string()))?
    }

    /// Reads the node records from the store (at start, and each round,
    /// for nodes that registered themselves); a node whose record is gone
    /// (forgotten, maybe by another replica) goes from the cache too.
    async fn load(&self) {
        // Not across a forget: a read from before its delete would bring
        // the node back.
        let _one = self.membership.lock().await;
        match self.store(|r| r.nodes()).await {
            Ok(nodes) => {
                let mut cache = self.cache.lock().expect("nodes");
                cache.retain(|id, _| nodes.iter().any(|n| &n.node_id == id));
                self.loaded
                    .store(true, std::sync::atomic::Ordering::Release);
                for n in nodes {
                    let Some(c) = cache.get_mut(&n.node_id) else {
                        // Never later than now: a node's clock ahead does
                        // not keep it ready once it stops answering.
                        let last_seen_unix_ns = n.last_seen_unix_ns.min(now_ns());
                        let n = NodeRecord {
                            last_seen_unix_ns,
                            ..n
                        };
                        cache.insert(n.node_id.clone(), n);
                        continue;
                    };
                    // Written under this lock (`set_draining`), or by hand.
                    c.draining = n.draining;
                    // The store may be older than what this process saw
                    // (it skips writes that change only the time), or
                    // newer (a node that reports itself): then its address
                    // and figures are taken, not that it is ready, nor
                    // its clock: whether a node answers is what this
                    // process's heartbeat found, by this process's clock.
                    if n.last_seen_unix_ns > c.last_seen_unix_ns {
                        *c = NodeRecord {
                            state: c.state,
                            message: std::mem::take(&mut c.message),
                            last_seen_unix_ns: c.last_seen_unix_ns,
                            ..n
                        };
                    }
                }
            }
            Err(e) => tracing::warn!(error = %e.message(), "reading node records"),
        }
    }

    /// Updates the cache, and the store when more than the time of the
    /// last answer changed (so a steady cluster does not write each round).
    /// A node that did not answer is only written if its record is still
    /// there (one forgotten meanwhile stays forgotten).
    async fn save(&self, mut rec: NodeRecord, answered: bool) {
        let before = {
            let mut cache = self.cache.lock().expect("nodes");
            if !answered && !cache.contains_key(&rec.node_id) {
                return;
            }
            // Only `set_draining` changes it.
            rec.draining = cache.get(&rec.node_id).is_some_and(|n| n.draining);
            cache.insert(rec.node_id.clone(), rec.clone())
        };
        // (One whose last write failed is written again.)
        let unsaved = self.unsaved.lock().expect("unsaved").contains(&rec.node_id);
        let same = before.is_some_and(|mut b| {
            b.last_seen_unix_ns = rec.last_seen_unix_ns;
            b == rec
        });
        if same && !unsaved {
            return;
        }
        // (The store keeps the `draining` it has: an older copy of the
        // flag here does not undo a drain or its end.)
        let _one = match answered {
            true => None,
            false => Some(self.membership.lock().await),
        };
        let id = rec.node_id.clone();
        let put = move |r: &dyn Records| {
            if answered || r.node(&rec.node_id)?.is_some() {
                r.put_node(&rec)?;
            }
            Ok(())
        };
        let stored = self.store(put).await;
        let mut unsaved = self.unsaved.lock().expect("unsaved");
        match stored {
            Ok(()) => unsaved.remove(&id),
            Err(e) => {
                tracing::warn!(node = %id, error = %e.message(), "recording a node (written again next round)");
                unsaved.insert(id)
            }
        };
    }

    /// Whether node `id` is not known at all: the store was read, and has
    /// no record of it (never registered, or forgotten). A node that is
    /// only away (stale, restarting) is known.
    pub fn forgotten(&self, id: &str) -> bool {
        if self.local.as_ref().is_some_and(|(l, _)| l == id) {
            return false;
        }
        self.loaded.load(std::sync::atomic::Ordering::Acquire)
            && !self.cache.lock().expect("nodes").contains_key(id)
    }

    /// Node `id`'s record, once it is sure to be gone: forgettable
    /// ([`Self::forgettable`]), and asked once more (it may have come back
    /// since the last heartbeat); FAILED_PRECONDITION if it answers.
    pub async fn confirm_gone(&self, id: &str) -> Result<NodeRecord, Status> {
        let rec = self.forgettable(id)?;
        let agent = self.agent_at(&rec.agent_address, id)?;
        let asked = agent.node_info(Request::new(NodeInfoRequest {}));
        let answer = match tokio::time::timeout(Duration::from_secs(2), asked).await {
            Ok(Ok(info)) if info.get_ref().node_id == id => Some("ready".to_string()),
            Ok(Ok(_)) => None,
            // No connection, or it broke: gone. An agent that answers
            // with an error is there.
            Ok(Err(e)) => match e.code() {
                tonic::Code::Unavailable
                | tonic::Code::Unknown
                | tonic::Code::Cancelled
                | tonic::Code::DeadlineExceeded => None,
                _ => Some(e.message().to_string()),
            },
            Err(_) => None,
        };
        match answer {
            Some(answer) => Err(Status::failed_precondition(format!(
                "node {id} answers the controller again ({answer}): it is not gone"
            ))),
            None => Ok(rec),
        }
    }

    /// Forgets node `rec` ([`Self::confirm_gone`]): its record goes, and
    /// what the controller would still clean up there is skipped from now
    /// on. The caller settles what is there first. If the node answers
    /// again later, it registers anew, as a new node.
    pub async fn forget(&self, rec: &NodeRecord) -> Result<(), Status> {
        let key = rec.node_id.clone();
        let _one = self.membership.lock().await;
        self.store(move |r| r.delete_node(&key)).await?;
        self.cache.lock().expect("nodes").remove(&rec.node_id);
        self.unsaved.lock().expect("unsaved").remove(&rec.node_id);
        // (With a shared certificate every agent's name is the same.)
        let name = self
            .tls
            .as_ref()
            .map(|t| t.server_name_of(Server::Node(&rec.node_id)))
            .filter(|n| n != crate::tls::SERVER_NAME);
        self.remotes
            .lock()
            .expect("remotes")
            .retain(|(address, n), _| {
                address != &rec.agent_address && name.as_ref().is_none_or(|name| n != name)
            });
        Ok(())
    }

    /// Node `id`'s record, if it could be forgotten: known, not this
    /// process's own, and not ready.
    pub fn forgettable(&self, id: &str) -> Result<NodeRecord, Status> {
        let rec = self.cache.lock().expect("nodes").get(id).cloned();
        let Some(rec) = rec else {
            return Err(Status::not_found(format!("node {id:?} is not known")));
        };
        if self.local.as_ref().is_some_and(|(l, _)| l == id) {
            return Err(Status::failed_precondition(format!(
                "node {id} is this controller's own node"
            )));
        }
        if rec.state == NodeState::Ready {
            return Err(Status::failed_precondition(format!(
                "node {id} answers the controller (it is ready): drain it, stop its node plugin, \
                 and forget it once it is stale ({} s without an answer)",
                self.heartbeat.stale_after.as_secs()
            )));
        }
        Ok(rec)
    }

    /// Whether node `id` is draining (`set_draining`).
    pub fn draining(&self, id: &str) -> bool {
        let cache = self.cache.lock().expect("nodes");
        cache.get(id).is_some_and(|n| n.draining)
    }

    /// Starts or ends the drain of `node_id`: while it drains, no new
    /// volume is placed on it (in the records, so it outlives restarts
    /// and the node's own reports).
    pub async fn set_draining(&self, node_id: &str, draining: bool) -> Result<(), Status> {
        let set = |to: bool| {
            let mut cache = self.cache.lock().expect("nodes");
            cache
                .get_mut(node_id)
                .map(|n| std::mem::replace(&mut n.draining, to))
        };
        // Under the lock `load` reads the store under: a read from before
        // this write cannot put the old flag back into the cache.
        let _one = self.membership.lock().await;
        let Some(was) = set(draining) else {
            return Err(Status::not_found(format!("node {node_id:?} is not known")));
        };
        let id = node_id.to_string();
        let stored = self
            .store(move |r| r.set_node_draining(&id, draining))
            .await;
        match stored {
            Ok(true) => Ok(()),
            Ok(false) => {
                set(was);
                Err(Status::not_found(format!("node {node_id:?} has no record")))
            }
            Err(e) => {
                set(was);
                Err(e)
            }
        }
    }

    /// The room a node has for new volumes, in bytes.
    pub fn room(&self, n: &NodeRecord) -> u64 {
        let thin = (n.capacity_bytes as f64 * self.overcommit) as u64;
        thin.saturating_sub(n.provisioned_bytes)
            .min((n.available_bytes as f64 * self.overcommit) as u64)
    }

    /// Gives back what [`Nodes::place`] counted on node `id` for a volume
    /// of `size` bytes that is not made there after all (the counts are
    /// the node's own again at its next heartbeat anyway).
    pub fn unplace(&self, id: &str, size: u64) {
        if let Some(n) = self.cache.lock().expect("nodes").get_mut(id) {
            n.provisioned_bytes = n.provisioned_bytes.saturating_sub(size);
            n.volumes = n.volumes.saturating_sub(1);
        }
    }

    /// Picks the node for a new empty volume of `size` bytes: among the
    /// ready nodes `allowed` accepts, the first of `preferred` with room,
    /// else the one with the most room. The choice is counted against the
    /// node at once (its cached provisioned bytes and volume count) until
    /// the next heartbeat brings the node's own figures, so a burst of
    /// creates inside one heartbeat cannot overcommit it.
    pub fn place(
        &self,
        size: u64,
        allowed: impl Fn(&str) -> bool,
        preferred: &[String],
    ) -> Result<String, Status> {
        let mut cache = self.cache.lock().expect("nodes");
        let mut fits: Vec<&NodeRecord> = cache
            .values()
            .filter(|n| n.state == NodeState::Ready && !n.draining && allowed(&n.node_id))
            .filter(|n| n.max_volumes == 0 || n.volumes < n.max_volumes)
            .filter(|n| self.room(n) >= size)
            .collect();
        fits.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let chosen = preferred
            .iter()
            .find(|p| fits.iter().any(|n| &n.node_id == *p))
            .cloned()
            .or_else(|| {
                fits.iter()
                    .rev()
                    .max_by_key(|n| self.room(n))
                    .map(|n| n.node_id.clone())
            });
        if let Some(id) = chosen {
            if let Some(n) = cache.get_mut(&id) {
                n.provisioned_bytes = n.provisioned_bytes.saturating_add(size);
                n.volumes = n.volumes.saturating_add(1);
            }
            return Ok(id);
        }
        let mut nodes: Vec<&NodeRecord> = cache.values().collect();
        nodes.sort_by(|a, b| a.node_id.cmp(&b.node_id));
        let seen: Vec<String> = nodes
            .iter()
            .map(|n| {
                let state = match n.state {
                    NodeState::Ready if !allowed(&n.node_id) => "excluded by topology",
                    NodeState::Ready if n.draining => "draining",
                    NodeState::Ready if n.max_volumes != 0 && n.volumes >= n.max_volumes => {
                        "at its volume limit"
                    }
                    NodeState::Ready => "too little room",
                    NodeState::Stale => "stale",
                };
                format!("{} ({state}, {} bytes free)", n.node_id, self.room(n))
            })
            .collect();
        Err(Status::resource_exhausted(format!(
            "no node can take a volume of {size} bytes within the accessibility requirements; nodes: [{}]",
            seen.join(", ")
        )))
    }

    /// One heartbeat round: ask every known agent at once and update the
    /// records. The round waits for answers for at most one interval; a
    /// question to a hung agent goes on in the background (until
    /// `stale_after`), and that agent is not asked again meanwhile, so
    /// one hung node neither slows the others' heartbeat nor piles up.
    pub async fn beat(self: &Arc<Self>) {
        self.load().await;
        if let Some((id, agent)) = &self.local {
            self.refresh(vec![id.clone()], String::new(), Arc::clone(agent), true)
                .await;
            return;
        }
        // One question per address and name checked, for the nodes
        // recorded there. A seed address is asked without a name:
        // whichever node answers there (another one than recorded, after
        // a swap or a reinstall) is recorded once it passes `confirmed`.
        // Any other address is asked on a connection that checks the
        // certificate names the node recorded there.
        let mut targets: HashMap<(String, String), Vec<String>> = HashMap::new();
        for a in &self.seeds {
            targets.entry((a.clone(), String::new())).or_default();
        }
        for n in self.list().unwrap_or_default() {
            let pin = if self.seeds.contains(&n.agent_address) {
                String::new()
            } else {
                n.node_id.clone()
            };
            targets
                .entry((n.agent_address.clone(), pin))
                .or_default()
                .push(n.node_id);
        }
        self.drop_unused_remotes();
        let mut round = tokio::task::JoinSet::new();
        for (key, known) in targets {
            let (address, pin) = &key;
            let agent = match self.agent_at(address, pin) {
                Ok(agent) => agent,
                Err(e) => {
                    tracing::warn!(%address, error = %e.message(), "agent address unusable");
                    continue;
                }
            };
            if !self.asking.lock().expect("asking").insert(key.clone()) {
                continue;
            }
            let nodes = Arc::clone(self);
            round.spawn(async move {
                let pinned = !key.1.is_empty();
                let address = key.0.clone();
                let asked = Asking { nodes: &nodes, key };
                asked.nodes.refresh(known, address, agent, pinned).await;
            });
        }
        let all = async { while round.join_next().await.is_some() {} };
        let _ = tokio::time::timeout(self.heartbeat.interval, all).await;
        round.detach_all();
    }

    /// Drops the connections to addresses and names no node is recorded
    /// at any more, nor a seed (a node whose address changed, a node
    /// reinstalled under another name): they would pile up otherwise.
    fn drop_unused_remotes(&self) {
        let Some(tls) = &self.tls else {
            return;
        };
        let mut used: std::collections::HashSet<(String, String)> = self
            .seeds
            .iter()
            .map(|a| (a.clone(), tls.server_name_of(Server::Any)))
            .collect();
        for n in self.cache.lock().expect("nodes").values() {
            let name = tls.server_name_of(Server::Node(&n.node_id));
            used.insert((n.agent_address.clone(), name));
        }
        self.remotes
            .lock()
            .expect("remotes")
            .retain(|key, _| used.contains(key));
    }

    /// Asks `agent` (at `address`, where nodes `known` are recorded; on a
    /// connection that checks the certificate names `known`'s one node if
    /// `pinned`) and records the answer. A node of `known` that did not
    /// answer is marked as not heard from.
    async fn refresh(
        &self,
        known: Vec<String>,
        address: String,
        agent: Arc<dyn Agent>,
        pinned: bool,
    ) {
        let now = now_ns();
        // A node that accepts the connection but never answers (hung) is
        // as stale as one that refuses it, and no later than that.
        let limit = self.heartbeat.stale_after;
        let answer = tokio::time::timeout(limit, agent.node_info(Request::new(NodeInfoRequest {})))
            .await
            .unwrap_or_else(|_| {
                Err(Status::deadline_exceeded(format!(
                    "no answer to the heartbeat within {} s",
                    limit.as_secs()
                )))
            });
        let (heard, why) = match answer {
            Ok(reply) => {
                let info = reply.into_inner();
                let id = info.node_id.clone();
                let checked = pinned && known.contains(&id);
                if checked || self.confirmed(&address, &id).await {
                    let rec = ready_record(info, address.clone(), now);
                    let was = self.cache.lock().expect("nodes").get(&id).cloned();
                    if was.as_ref().is_none_or(|w| w.state != NodeState::Ready) {
                        tracing::info!(node = %id, %address, "node is ready");
                    }
                    self.save(rec, true).await;
                    let why = format!("node {id} answers at {address}");
                    (Some(id), why)
                } else {
                    let why = format!("the agent at {address} is not shown to be node {id}");
                    (None, why)
                }
            }
            Err(e) => {
                if known.is_empty() {
                    tracing::debug!(%address, error = %e.message(), "agent not reachable yet");
                }
                (None, e.message().to_string())
            }
        };
        for node in known.iter().filter(|n| heard.as_ref() != Some(n)) {
            self.not_heard(node, &address, now, &why).await;
        }
    }

    /// Node `node`, recorded at `address`, did not answer there (`why`):
    /// stale once it has been silent for `stale_after`. Nothing changes if
    /// it is recorded at another address by now (it answered there).
    async fn not_heard(&self, node: &str, address: &str, now: u64, why: &str) {
        let Some(mut rec) = self.cache.lock().expect("nodes").get(node).cloned() else {
            return;
        };
        if rec.agent_address != address {
            return;
        }
        let silent = Duration::from_nanos(now.saturating_sub(rec.last_seen_unix_ns));
        if rec.state == NodeState::Ready && silent >= self.heartbeat.stale_after {
            tracing::warn!(%node, error = %why, "node is stale");
            rec.state = NodeState::Stale;
        }
        rec.message = why.to_string();
        self.save(rec, false).await;
    }

    /// Whether the agent at `address`, which said it is node `said` on a
    /// connection that did not check that, has a certificate that names
    /// `said`: with a certificate per process it is asked again on a
    /// connection that checks it (a node cannot pass for another), which
    /// is kept only if it does.
    async fn confirmed(&self, address: &str, said: &str) -> bool {
        let Some(tls) = &self.tls else {
            return true;
        };
        let server = Server::Node(said);
        if tls.server_name_of(server) == tls.server_name_of(Server::Any) {
            return true;
        }
        let key = (address.to_string(), tls.server_name_of(server));
        let kept = self.remotes.lock().expect("remotes").get(&key).cloned();
        let agent: Arc<dyn Agent> = match kept {
            Some(a) => a,
            None => match RemoteAgent::new(address, server, tls) {
                Ok(a) => Arc::new(a),
                Err(_) => return false,
            },
        };
        let asked = agent.node_info(Request::new(NodeInfoRequest {}));
        match tokio::time::timeout(self.heartbeat.stale_after, asked).await {
            Ok(Ok(r)) if r.get_ref().node_id == said => {
                self.remotes.lock().expect("remotes").insert(key, agent);
                true
            }
            Ok(Ok(_)) | Err(_) => false,
            Ok(Err(e)) => {
                tracing::warn!(%address, node = %said, error = %e.message(), "the agent says it is this node, and its certificate does not name it: not recorded");
                false
            }
        }
    }

    /// Runs the heartbeat until the process ends.
    pub async fn run(self: Arc<Self>) {
        let mut tick = tokio::time::interval(self.heartbeat.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            self.beat().await;
        }
    }
}

/// An agent being asked; the mark goes when the question ends, however it
/// ends.
struct Asking<'a> {
    nodes: &'a Nodes,
    key: (String, String),
}

impl Drop for Asking<'_> {
    fn drop(&mut self) {
        self.nodes
            .asking
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&self.key);
    }
}

/// The record of a node that just answered NodeInfo.
fn ready_record(info: NodeInfoReply, agent_address: String, now: u64) -> NodeRecord {
    NodeRecord {
        node_id: info.node_id,
        agent_address,
        version: info.version,
        capacity_bytes: info.capacity_bytes,
        available_bytes: info.available_bytes,
        provisioned_bytes: info.provisioned_bytes,
        max_volumes: info.max_volumes,
        volumes: info.volumes,
        state: NodeState::Ready,
        message: String::new(),
        last_seen_unix_ns: now,
        draining: false,
    }
}

/// How often a node reports itself when it keeps its own record.
const REPORT_INTERVAL: Duration = Duration::from_secs(10);

/// A node's own registration: every [`REPORT_INTERVAL`], write this
/// node's record (agent address, room, version, ready now) to `records`.
/// The controller's heartbeat decides whether it is stale.
pub async fn register(records: Arc<dyn Records>, agent: Arc<dyn Agent>, address: String) {
    let mut tick = tokio::time::interval(REPORT_INTERVAL);
    loop {
        tick.tick().await;
        let info = match agent.node_info(Request::new(NodeInfoRequest {})).await {
            Ok(r) => r.into_inner(),
            Err(e) => {
                tracing::warn!(error = %e.message(), "node report");
                continue;
            }
        };
        let rec = ready_record(info, address.clone(), now_ns());
        let records = Arc::clone(&records);
        // (A drain set by the controller stays set: `put_node` keeps it.)
        let put = move || records.put_node(&rec);
        match tokio::task::spawn_blocking(put).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => tracing::warn!(error = %e, "registering the node"),
            Err(e) => tracing::warn!(error = %e, "registering the node"),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cluster::records::EmbeddedRecords;

    const MIB: u64 = 1 << 20;

    fn nodes(dir: &std::path::Path, rooms: &[(&str, u64)]) -> Nodes {
        let records = Arc::new(EmbeddedRecords::open(&dir.join("records.redb")).unwrap());
        let nodes = Nodes::new(records, None, Vec::new(), 1.0, Heartbeat::default());
        for (id, room) in rooms {
            let info = NodeInfoReply {
                node_id: id.to_string(),
                capacity_bytes: *room,
                available_bytes: *room,
                max_volumes: 3,
                ..Default::default()
            };
            let rec = ready_record(info, format!("{id}:9809"), now_ns());
            nodes.cache.lock().unwrap().insert(id.to_string(), rec);
        }
        nodes
    }

    #[test]
    fn a_burst_of_creates_is_counted_before_the_next_heartbeat() {
        let dir = tempfile::tempdir().unwrap();
        let n = nodes(dir.path(), &[("n1", 100 * MIB), ("n2", 60 * MIB)]);
        let any = |_: &str| true;
        // Most room first, and each choice counts at once.
        assert_eq!(n.place(50 * MIB, any, &[]).unwrap(), "n1");
        assert_eq!(n.place(50 * MIB, any, &[]).unwrap(), "n2");
        assert_eq!(n.place(50 * MIB, any, &[]).unwrap(), "n1");
        let e = n.place(50 * MIB, any, &[]).unwrap_err();
        assert_eq!(e.code(), tonic::Code::ResourceExhausted);
        assert!(
            e.message().contains("n1 (too little room, 0 bytes free)"),
            "{e:?}"
        );
        assert!(
            e.message()
                .contains("n2 (too little room, 10485760 bytes free)"),
            "{e:?}"
        );
        // A preference is honoured while the node has room.
        assert_eq!(n.place(5 * MIB, any, &["n2".into()]).unwrap(), "n2");
        // The volume limit counts too (n2 now holds 2 of its 3).
        assert_eq!(n.place(MIB, any, &["n2".into()]).unwrap(), "n2");
        let e = n.place(MIB, |id| id == "n2", &[]).unwrap_err();
        assert!(e.message().contains("n2 (at its volume limit"), "{e:?}");
        assert!(e.message().contains("n1 (excluded by topology"), "{e:?}");
    }

    /// A drain and its end are what the store keeps, whatever copies of
    /// the record made before them are written after them (a node's own
    /// report, a heartbeat's); and a node's own report gives its address,
    /// never that it answers, nor its clock.
    #[tokio::test]
    async fn a_drain_outlives_older_copies_and_a_node_does_not_vouch_for_itself() {
        let dir = tempfile::tempdir().unwrap();
        let n = nodes(dir.path(), &[("n1", 100 * MIB)]);
        let records = Arc::clone(&n.records);
        let rec = n.cache.lock().unwrap()["n1"].clone();
        records.put_node(&rec).unwrap();
        let stored = |r: &Arc<dyn Records>| r.node("n1").unwrap().unwrap();

        n.set_draining("n1", true).await.unwrap();
        records.put_node(&rec).unwrap();
        assert!(stored(&records).draining);
        n.load().await;
        assert!(n.draining("n1"));
        n.save(
            NodeRecord {
                volumes: 1,
                ..rec.clone()
            },
            true,
        )
        .await;
        assert!(stored(&records).draining && stored(&records).volumes == 1);

        n.set_draining("n1", false).await.unwrap();
        records
            .put_node(&NodeRecord {
                draining: true,
                ..rec.clone()
            })
            .unwrap();
        assert!(!stored(&records).draining);
        n.load().await;
        assert!(!n.draining("n1"));
        assert_eq!(
            n.set_draining("n9", true).await.unwrap_err().code(),
            tonic::Code::NotFound
        );

        // Stale to this process; the node says it is ready, with a clock
        // an hour ahead, at a new address.
        {
            let mut cache = n.cache.lock().unwrap();
            let c = cache.get_mut("n1").unwrap();
            c.state = NodeState::Stale;
            c.last_seen_unix_ns = 1;
        }
        records
            .put_node(&NodeRecord {
                agent_address: "n1-again:9809".into(),
                last_seen_unix_ns: now_ns() + 3_600_000_000_000,
                ..rec.clone()
            })
            .unwrap();
        n.load().await;
        let c = n.cache.lock().unwrap()["n1"].clone();
        assert_eq!(c.agent_address, "n1-again:9809");
        assert_eq!((c.state, c.last_seen_unix_ns), (NodeState::Stale, 1));
        let e = n.agent("n1").err().expect("a stale node's agent");
        assert_eq!(e.code(), tonic::Code::Unavailable);

        // A node new to this process is taken as it says, but not with a
        // time later than now.
        records
            .put_node(&NodeRecord {
                node_id: "n2".into(),
                last_seen_unix_ns: now_ns() + 3_600_000_000_000,
                ..rec.clone()
            })
            .unwrap();
        n.load().await;
        let c = n.cache.lock().unwrap()["n2"].clone();
        assert!(c.last_seen_unix_ns <= now_ns(), "{c:?}");
    }
}
