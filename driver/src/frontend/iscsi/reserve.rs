//! Reservations of each unit, shared by every session of the node's
//! target: persistent reservations (SPC-5 PERSISTENT RESERVE IN and OUT:
//! registration keys, the six reservation types, PREEMPT, CLEAR, READ
//! FULL STATUS), what clustered initiators (Windows failover clusters,
//! Pacemaker's fence_scsi) fence each other with; and the older RESERVE(6)
//! and RELEASE(6).
//!
//! An initiator port (an I_T nexus: initiator name and ISID) registers a
//! key; a registered port takes a reservation of a type; commands from
//! other ports then get RESERVATION CONFLICT as SPC-5's table of commands
//! says for that type. Registrations and the reservation survive the
//! sessions that made them (not the process: APTPL, keeping them across a
//! power loss, is refused, and a restart of Strata is one). A RESERVE(6)
//! reservation ends with its session, a LUN RESET or a target reset.
//!
//! Written by hand: reservations are state of this target, no crate has
//! them.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock, Weak};

use super::scsi::{Sense, be16, be32, be64, opcode::*, truncate};

/// PERSISTENT RESERVE IN and OUT, RESERVE(6) and RELEASE(6).
pub const PERSISTENT_RESERVE_IN: u8 = 0x5e;
pub const PERSISTENT_RESERVE_OUT: u8 = 0x5f;
pub const RESERVE_6: u8 = 0x16;
pub const RELEASE_6: u8 = 0x17;

/// Registrations one unit keeps (each port registers once).
const MAX_REGISTRATIONS: usize = 64;

/// Reservation types (SPC-5 table 206).
const WRITE_EXCLUSIVE: u8 = 1;
const EXCLUSIVE_ACCESS: u8 = 3;
const WRITE_EXCLUSIVE_REGISTRANTS_ONLY: u8 = 5;
const EXCLUSIVE_ACCESS_REGISTRANTS_ONLY: u8 = 6;
const WRITE_EXCLUSIVE_ALL_REGISTRANTS: u8 = 7;
const EXCLUSIVE_ACCESS_ALL_REGISTRANTS: u8 = 8;

impl Sense {
    /// Not sense data: the command ends with status RESERVATION CONFLICT.
    pub const RESERVATION_CONFLICT: Sense = Sense::illegal(0xff, 0xff);
    pub const INVALID_RELEASE: Sense = Sense::illegal(0x26, 0x04);
    pub const INSUFFICIENT_REGISTRATION_RESOURCES: Sense = Sense::illegal(0x55, 0x04);
}

#[derive(Debug, Clone)]
struct Reservation {
    /// The holder's port (any registrant for the all-registrants types).
    holder: String,
    kind: u8,
}

#[derive(Debug, Default)]
struct Unit {
    generation: u32,
    /// (port, key), in registration order.
    registered: Vec<(String, u64)>,
    reservation: Option<Reservation>,
    /// The port holding a RESERVE(6) reservation, and its session.
    reserved_by: Option<(String, u64)>,
}

impl Unit {
    fn key_of(&self, port: &str) -> Option<u64> {
        self.registered
            .iter()
            .find(|(p, _)| p == port)
            .map(|(_, k)| *k)
    }

    fn all_registrants(&self) -> bool {
        self.reservation.as_ref().is_some_and(|r| {
            matches!(
                r.kind,
                WRITE_EXCLUSIVE_ALL_REGISTRANTS | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
            )
        })
    }

    /// Whether `port` holds the persistent reservation.
    fn holds(&self, port: &str) -> bool {
        match &self.reservation {
            None => false,
            Some(_) if self.all_registrants() => self.key_of(port).is_some(),
            Some(r) => r.holder == port,
        }
    }

    /// Drops `port`'s registration (and the reservation it held).
    fn unregister(&mut self, port: &str) {
        self.registered.retain(|(p, _)| p != port);
        let gone = match &self.reservation {
            Some(_) if self.all_registrants() => self.registered.is_empty(),
            Some(r) => r.holder == port,
            None => false,
        };
        if gone {
            self.reservation = None;
        }
    }
}

/// How a command may touch a unit: whether reservations stop it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// Never stopped by a reservation (INQUIRY, PERSISTENT RESERVE IN...).
    Any,
    Read,
    Write,
}

fn access(cdb: &[u8; 16]) -> Access {
    match cdb[0] {
        INQUIRY
        | REPORT_LUNS
        | REQUEST_SENSE
        | TEST_UNIT_READY
        | READ_CAPACITY_10
        | LOG_SENSE
        | PERSISTENT_RESERVE_IN
        | PERSISTENT_RESERVE_OUT
        | RESERVE_6
        | RELEASE_6 => Access::Any,
        SERVICE_ACTION_IN_16 if cdb[1] & 0x1f == 0x10 => Access::Any,
        MAINTENANCE_IN => Access::Any,
        READ_6 | READ_10 | READ_12 | READ_16 | VERIFY_10 | VERIFY_12 | VERIFY_16 | PREFETCH_10
        | PREFETCH_16 | MODE_SENSE_6 | MODE_SENSE_10 | SERVICE_ACTION_IN_16
        | THIRD_PARTY_COPY_IN => Access::Read,
        THIRD_PARTY_COPY_OUT if cdb[1] & 0x1f == super::copy::POPULATE_TOKEN => Access::Read,
        _ => Access::Write,
    }
}

/// LOG SENSE: allowed under every reservation.
const LOG_SENSE: u8 = 0x4d;

/// The reservations of the node's units.
#[derive(Debug, Default)]
pub struct Reservations {
    units: Mutex<HashMap<String, Unit>>,
    /// Each unit's fence: writes hold it shared, changes to reservations
    /// exclusive, so a write admitted before a PREEMPT has landed when the
    /// PREEMPT returns, and none admitted after it gets through.
    fences: Mutex<HashMap<String, Weak<RwLock<()>>>>,
    sessions: AtomicU64,
    /// Whether any unit has had a reservation or registration: until one
    /// has, checks skip the lock (every command is checked).
    used: AtomicBool,
}

impl Reservations {
    fn fence(&self, unit: &str) -> Arc<RwLock<()>> {
        let mut fences = self.fences.lock().expect("fences");
        if let Some(f) = fences.get(unit).and_then(Weak::upgrade) {
            return f;
        }
        fences.retain(|_, w| w.strong_count() > 0);
        let f = Arc::new(RwLock::new(()));
        fences.insert(unit.to_string(), Arc::downgrade(&f));
        f
    }

    /// Whether a reservation on `unit` stops `port` (of session
    /// `session`) from a command of this access; `legacy_exempt`: a
    /// command a RESERVE(6) reservation lets through (INQUIRY...).
    fn check(
        &self,
        unit: &str,
        port: &str,
        access: Access,
        legacy_exempt: bool,
    ) -> Result<(), Sense> {
        let units = self.units.lock().expect("reservations");
        let Some(u) = units.get(unit) else {
            return Ok(());
        };
        if let Some((holder, _)) = &u.reserved_by
            && holder != port
            && !legacy_exempt
        {
            return Err(Sense::RESERVATION_CONFLICT);
        }
        let Some(r) = &u.reservation else {
            return Ok(());
        };
        if access == Access::Any || u.holds(port) {
            return Ok(());
        }
        let registered = u.key_of(port).is_some();
        let stopped = match r.kind {
            WRITE_EXCLUSIVE => access == Access::Write,
            EXCLUSIVE_ACCESS => true,
            WRITE_EXCLUSIVE_REGISTRANTS_ONLY | WRITE_EXCLUSIVE_ALL_REGISTRANTS => {
                access == Access::Write && !registered
            }
            _ => !registered,
        };
        if stopped {
            Err(Sense::RESERVATION_CONFLICT)
        } else {
            Ok(())
        }
    }
}

/// One session's side: its port and unit.
#[derive(Debug)]
pub struct Port {
    all: Arc<Reservations>,
    unit: String,
    /// The initiator port: `<initiator name>,i,0x<ISID>`.
    name: String,
    /// This session (two sessions may claim one port name).
    session: u64,
    fence: Arc<RwLock<()>>,
}

impl Drop for Port {
    /// The session ended: its RESERVE(6) reservation ends with it.
    fn drop(&mut self) {
        let session = self.session;
        self.legacy(|r| {
            if r.as_ref().is_some_and(|(_, s)| *s == session) {
                *r = None;
            }
        });
    }
}

impl Port {
    pub fn new(all: Arc<Reservations>, unit: String, initiator: &str, isid: [u8; 6]) -> Self {
        let hex: String = isid.iter().map(|b| format!("{b:02x}")).collect();
        Port {
            session: all.sessions.fetch_add(1, Ordering::Relaxed),
            fence: all.fence(&unit),
            all,
            unit,
            name: format!("{initiator},i,0x{hex}"),
        }
    }

    /// Runs `f` on this port's unit. A unit's entry is made by the first
    /// change to its reservations and then stays (its generation only
    /// grows): one per unit a session ever reserved or registered on.
    fn with<T>(&self, f: impl FnOnce(&mut Unit) -> T) -> T {
        let mut units = self.all.units.lock().expect("reservations");
        self.all.used.store(true, Ordering::Release);
        f(units.entry(self.unit.clone()).or_default())
    }

    /// Runs `f` on this port's unit as it is, making no entry.
    fn read<T>(&self, f: impl FnOnce(&Unit) -> T) -> T {
        let units = self.all.units.lock().expect("reservations");
        f(units.get(&self.unit).unwrap_or(&Unit::default()))
    }

    /// Runs `f` on the unit's RESERVE(6) holder, if the unit has an entry.
    fn legacy(&self, f: impl FnOnce(&mut Option<(String, u64)>)) {
        if let Some(u) = self
            .all
            .units
            .lock()
            .expect("reservations")
            .get_mut(&self.unit)
        {
            f(&mut u.reserved_by);
        }
    }

    /// LUN RESET or a target reset: a RESERVE(6) reservation ends
    /// (persistent ones do not).
    pub fn reset(&self) {
        self.legacy(|r| *r = None);
    }

    /// Whether a reservation stops `cdb` from this port (checked when the
    /// command arrives; writes are checked again as they land).
    pub fn check(&self, cdb: &[u8; 16]) -> Result<(), Sense> {
        let exempt = matches!(cdb[0], INQUIRY | REPORT_LUNS | REQUEST_SENSE | RELEASE_6);
        self.all.check(&self.unit, &self.name, access(cdb), exempt)
    }

    /// Whether `cdb` writes (and so runs under [`Port::writing`]).
    pub fn writes(cdb: &[u8; 16]) -> bool {
        access(cdb) == Access::Write
    }

    /// Whether this port may read `unit` (another unit an EXTENDED COPY
    /// names).
    pub fn may_read(&self, unit: &str) -> Result<(), Sense> {
        self.all.check(unit, &self.name, Access::Read, false)
    }

    /// Runs `f`, a write to `unit` (this port's own if `None`), under
    /// that unit's fence, if no reservation stops this port from writing.
    pub fn writing<T>(
        &self,
        unit: Option<&str>,
        f: impl FnOnce() -> Result<T, Sense>,
    ) -> Result<T, Sense> {
        let unit = unit.unwrap_or(&self.unit);
        let fence = if unit == self.unit {
            Arc::clone(&self.fence)
        } else {
            self.all.fence(unit)
        };
        let _shared = fence.read().expect("fence");
        self.all.check(unit, &self.name, Access::Write, false)?;
        f()
    }

    /// RESERVE(6): the unit for this port alone, unless persistent
    /// reservations are in use.
    pub fn reserve6(&self) -> Result<(), Sense> {
        let _exclusive = self.fence.write().expect("fence");
        self.with(|u| {
            if !u.registered.is_empty() || u.reservation.is_some() {
                return Err(Sense::RESERVATION_CONFLICT);
            }
            match &u.reserved_by {
                Some((p, _)) if *p != self.name => Err(Sense::RESERVATION_CONFLICT),
                _ => {
                    u.reserved_by = Some((self.name.clone(), self.session));
                    Ok(())
                }
            }
        })
    }

    /// RELEASE(6): ends this port's RESERVE(6) reservation (GOOD
    /// whatever there was).
    pub fn release6(&self) -> Result<(), Sense> {
        self.read(|u| {
            if !u.registered.is_empty() || u.reservation.is_some() {
                return Err(Sense::RESERVATION_CONFLICT);
            }
            Ok(())
        })?;
        self.legacy(|r| {
            if r.as_ref().is_some_and(|(p, _)| *p == self.name) {
                *r = None;
            }
        });
        Ok(())
    }

    /// PERSISTENT RESERVE IN.
    pub fn reserve_in(&self, cdb: &[u8; 16], data_in: &mut Vec<u8>) -> Result<(), Sense> {
        let allocation = be16(&cdb[7..]);
        let d = self.read(|u| -> Result<Vec<u8>, Sense> {
            // A RESERVE(6) reservation: persistent ones are not in use.
            if u.reserved_by.is_some() {
                return Err(Sense::RESERVATION_CONFLICT);
            }
            let mut d = u.generation.to_be_bytes().to_vec();
            match cdb[1] & 0x1f {
                // READ KEYS
                0 => {
                    d.extend_from_slice(&((8 * u.registered.len()) as u32).to_be_bytes());
                    for (_, k) in &u.registered {
                        d.extend_from_slice(&k.to_be_bytes());
                    }
                }
                // READ RESERVATION
                1 => match &u.reservation {
                    None => d.extend_from_slice(&0u32.to_be_bytes()),
                    Some(r) => {
                        d.extend_from_slice(&16u32.to_be_bytes());
                        // All registrants: the key is 0.
                        let key = if u.all_registrants() {
                            0
                        } else {
                            u.key_of(&r.holder).unwrap_or(0)
                        };
                        d.extend_from_slice(&key.to_be_bytes());
                        d.extend_from_slice(&[0, 0, 0, 0, 0, r.kind, 0, 0]);
                    }
                },
                // REPORT CAPABILITIES: no persistence across power loss,
                // every type.
                2 => {
                    d = vec![0, 8, 0x00, 0x80, 0xea, 0x01, 0, 0];
                }
                // READ FULL STATUS
                3 => {
                    let mut all = Vec::new();
                    for (port, key) in &u.registered {
                        let mut e = key.to_be_bytes().to_vec();
                        e.extend_from_slice(&[0; 4]);
                        let holder = u.holds(port);
                        e.push(u8::from(holder));
                        e.push(match (&u.reservation, holder) {
                            (Some(r), true) => r.kind,
                            _ => 0,
                        });
                        e.extend_from_slice(&[0; 4]);
                        e.extend_from_slice(&1u16.to_be_bytes());
                        // iSCSI TransportID, format 01b: the port's name.
                        let mut name = port.as_bytes().to_vec();
                        name.push(0);
                        name.resize(name.len().next_multiple_of(4).max(20), 0);
                        let mut id = vec![0x45, 0];
                        id.extend_from_slice(&(name.len() as u16).to_be_bytes());
                        id.extend_from_slice(&name);
                        e.extend_from_slice(&(id.len() as u32).to_be_bytes());
                        e.extend_from_slice(&id);
                        all.extend_from_slice(&e);
                    }
                    d.extend_from_slice(&(all.len() as u32).to_be_bytes());
                    d.extend_from_slice(&all);
                }
                _ => return Err(Sense::INVALID_FIELD_IN_CDB),
            }
            Ok(d)
        })?;
        data_in.extend_from_slice(&d);
        truncate(data_in, allocation);
        Ok(())
    }

    /// PERSISTENT RESERVE OUT with its 24-byte parameter list.
    pub fn reserve_out(&self, cdb: &[u8; 16], data: &[u8]) -> Result<(), Sense> {
        let action = cdb[1] & 0x1f;
        let (scope, kind) = (cdb[2] >> 4, cdb[2] & 0x0f);
        if action > 6 {
            // REGISTER AND MOVE is not supported.
            return Err(Sense::INVALID_FIELD_IN_CDB);
        }
        if be32(&cdb[5..]) != 24 || data.len() != 24 {
            return Err(Sense::PARAMETER_LIST_LENGTH);
        }
        let key = be64(data);
        let new_key = be64(&data[8..]);
        let registering = matches!(action, 0 | 6);
        // SPEC_I_PT, ALL_TG_PT and APTPL (REGISTER's bits, ignored by the
        // other actions) are not supported.
        if registering && data[20] & 0x0d != 0 {
            return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
        }
        let type_ok = scope == 0
            && matches!(
                kind,
                WRITE_EXCLUSIVE
                    | EXCLUSIVE_ACCESS
                    | WRITE_EXCLUSIVE_REGISTRANTS_ONLY
                    | EXCLUSIVE_ACCESS_REGISTRANTS_ONLY
                    | WRITE_EXCLUSIVE_ALL_REGISTRANTS
                    | EXCLUSIVE_ACCESS_ALL_REGISTRANTS
            );
        let me = self.name.as_str();
        // Writes in flight on the unit land first; none admitted after
        // this change gets past it.
        let _exclusive = self.fence.write().expect("fence");
        self.with(|u| {
            // A RESERVE(6) reservation: persistent ones are not in use.
            if u.reserved_by.is_some() {
                return Err(Sense::RESERVATION_CONFLICT);
            }
            let mine = u.key_of(me);
            // REGISTER AND IGNORE EXISTING KEY skips the key check.
            if action != 6 && mine.unwrap_or(0) != key {
                return Err(Sense::RESERVATION_CONFLICT);
            }
            if matches!(action, 1 | 2 | 4 | 5) && !type_ok {
                return Err(Sense::INVALID_FIELD_IN_CDB);
            }
            match action {
                // REGISTER, REGISTER AND IGNORE EXISTING KEY
                0 | 6 => {
                    match (mine, new_key) {
                        (None, 0) => return Ok(()),
                        (None, k) => {
                            if u.registered.len() >= MAX_REGISTRATIONS {
                                return Err(Sense::INSUFFICIENT_REGISTRATION_RESOURCES);
                            }
                            u.registered.push((me.to_string(), k));
                        }
                        (Some(_), 0) => u.unregister(me),
                        (Some(_), k) => {
                            for r in u.registered.iter_mut().filter(|(p, _)| p == me) {
                                r.1 = k;
                            }
                        }
                    }
                    u.generation = u.generation.wrapping_add(1);
                }
                // RESERVE
                1 => {
                    if mine.is_none() {
                        return Err(Sense::RESERVATION_CONFLICT);
                    }
                    match &u.reservation {
                        Some(r) if r.kind != kind || !u.holds(me) => {
                            return Err(Sense::RESERVATION_CONFLICT);
                        }
                        Some(_) => {}
                        None => {
                            u.reservation = Some(Reservation {
                                holder: me.to_string(),
                                kind,
                            });
                        }
                    }
                }
                // RELEASE
                2 => {
                    if mine.is_none() {
                        return Err(Sense::RESERVATION_CONFLICT);
                    }
                    if let Some(r) = &u.reservation
                        && u.holds(me)
                    {
                        if r.kind != kind {
                            return Err(Sense::INVALID_RELEASE);
                        }
                        u.reservation = None;
                    }
                }
                // CLEAR
                3 => {
                    if mine.is_none() {
                        return Err(Sense::RESERVATION_CONFLICT);
                    }
                    u.registered.clear();
                    u.reservation = None;
                    u.generation = u.generation.wrapping_add(1);
                }
                // PREEMPT, PREEMPT AND ABORT (commands run as they
                // arrive: none of the preempted ports' is in progress).
                _ => {
                    if mine.is_none() {
                        return Err(Sense::RESERVATION_CONFLICT);
                    }
                    let holder_key = u.reservation.as_ref().and_then(|r| u.key_of(&r.holder));
                    if u.all_registrants() && new_key == 0 {
                        // Everyone else goes; the reservation becomes this
                        // port's, of the given type.
                        u.registered.retain(|(p, _)| p == me);
                        u.reservation = Some(Reservation {
                            holder: me.to_string(),
                            kind,
                        });
                    } else if new_key == 0 {
                        return Err(Sense::INVALID_FIELD_IN_PARAMETERS);
                    } else {
                        let had = u.registered.len();
                        let takes_over = !u.all_registrants() && holder_key == Some(new_key);
                        u.registered.retain(|(p, k)| *k != new_key || p == me);
                        if u.registered.len() == had && !takes_over {
                            return Err(Sense::RESERVATION_CONFLICT);
                        }
                        if takes_over {
                            u.reservation = Some(Reservation {
                                holder: me.to_string(),
                                kind,
                            });
                        } else if u
                            .reservation
                            .as_ref()
                            .is_some_and(|r| !u.registered.iter().any(|(p, _)| *p == r.holder))
                            && !u.all_registrants()
                        {
                            u.reservation = None;
                        }
                    }
                    u.generation = u.generation.wrapping_add(1);
                }
            }
            Ok(())
        })
    }
}
