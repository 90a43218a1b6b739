//! The Lua scripts: every change to a group's history is one script, so that
//! Redis executes it atomically. Each touches only the group's own keys
//! (`KEYS[1]` its head hash, `KEYS[2]` its stream), which share a hash tag, so
//! the layout works on Redis Cluster too.
//!
//! The head hash holds `e` (the epoch), `l` (the newest offset of the epoch),
//! `b` (payload bytes retained) and `n` (messages retained). Stream entry
//! `<offset>-0` holds `b` (the encoded message), `z` (its payload size) and
//! `t` (its timestamp, ms).
//!
//! Every group script takes the same first arguments ([`COMMON_ARGS`]):
//! 1 a fresh candidate epoch, 2 the oldest timestamp allowed (0: none), 3 the
//! epoch and 4 the offset the calling server knows to exist (its *floor*: ''
//! and 0 for none), 5 the meta TTL in seconds, 6 the group's pub/sub channel.
//! Script-specific arguments follow.
//!
//! Why the floor: Redis replication and snapshots are asynchronous, so Redis
//! can come back with a group's head *below* offsets it already handed out
//! (a restart from an older snapshot, a promoted replica that lacked the
//! newest writes). Taking the next offset from such a head would name a
//! second message with an (epoch, offset) pair that clients already hold.
//! Every script therefore first compares the head with the caller's floor
//! and with the stream ([`CHECK`]); when the head is behind the floor in the
//! floor's epoch, or head and stream disagree, the same script moves the
//! group to a new epoch before anything else happens. A head in an epoch
//! *made before* the floor's is a rollback too: Redis lost the group, a new
//! epoch replaced it, and a snapshot from before the loss brought the old
//! epoch back, whose offsets past the snapshot were handed out already.
//! Epochs say when they were made (`store::new_epoch`: milliseconds, then
//! random digits); epochs of another form are never judged older. Clocks of
//! servers that differ can only cost an extra epoch move, never a reuse. Because the move is a
//! compare-and-set on the old epoch inside one script, two servers noticing
//! at once make one new epoch: the second finds the epoch changed already.
//!
//! What the scripts publish — `S` saved messages (append), `R` resets
//! (flush), `M` moves (the rollback check) — is built here by hand, in the
//! layout [`crate::wire`] defines and reads; `tests/wire_scripts.rs` runs
//! these scripts and decodes their payloads with that codec, so a change to
//! either side must change both.

/// How many arguments every group script takes before its own.
pub(crate) const COMMON_ARGS: usize = 6;

/// The longest an epoch created by a read alone lives without a message.
pub(crate) const READ_EPOCH_TTL_SECS: u64 = 600;

/// Reads the head once into locals (`epoch`, `last`, `count`, `bytes`, kept
/// up to date by the rest of the script) and creates the group's epoch when
/// missing (from `ARGV[1]`, a fresh candidate): shared by every script, so a
/// group gets its epoch the first time any server reads or writes it. A
/// stream left without its head (an eviction) goes too: its offsets belong to
/// a lost epoch. An epoch created here lives [`READ_EPOCH_TTL_SECS`] (or the
/// meta TTL, when shorter) unless a message is saved, so that reads of
/// random names do not grow Redis.
const ENSURE_EPOCH: &str = r#"
local created = false
local h = redis.call('HMGET', KEYS[1], 'e', 'l', 'n', 'b')
local epoch, last, count, bytes = h[1], tonumber(h[2]) or 0, tonumber(h[3]) or 0, tonumber(h[4]) or 0
if not epoch then
  epoch, last, count, bytes = ARGV[1], 0, 0, 0
  redis.call('HSET', KEYS[1], 'e', epoch, 'l', 0, 'b', 0, 'n', 0)
  redis.call('DEL', KEYS[2])
  redis.call('EXPIRE', KEYS[1], math.min(READ_EPOCH_TTL, tonumber(ARGV[5])))
  created = true
end
"#;

/// The rollback check (see the module docs): after `ENSURE_EPOCH`, moves the
/// group to the new epoch `ARGV[1]` when its head is below the caller's
/// floor in the floor's epoch or in an epoch made before the floor's
/// (`born`), or when the head's count and the stream's
/// length differ (a stream evicted or lost while its head survived, stale
/// counters). The new epoch keeps the surviving messages under their offsets,
/// recounts `b` and `n` from them, continues after the newest offset either
/// side knew, and is announced on the group's channel as `M<epoch>\n<last>`
/// before anything else of it.
const CHECK: &str = r#"
local function born(e)
  local t = string.match(e, '^(%x%x%x%x%x%x%x%x%x%x%x%x)%-%x+$')
  return t and tonumber(t, 16)
end
if not created then
  local before = born(epoch) and born(ARGV[3]) and born(epoch) < born(ARGV[3])
  local behind = ARGV[3] ~= '' and ((ARGV[3] == epoch and last < tonumber(ARGV[4])) or before)
  if behind or redis.call('XLEN', KEYS[2]) ~= count then
    bytes, count = 0, 0
    for _, entry in ipairs(redis.call('XRANGE', KEYS[2], '-', '+')) do
      count = count + 1
      local newest = tonumber(string.match(entry[1], '^(%d+)')) or 0
      if newest > last then last = newest end
      local fields = entry[2]
      for i = 1, #fields, 2 do
        if fields[i] == 'z' then bytes = bytes + (tonumber(fields[i + 1]) or 0) end
      end
    end
    epoch = ARGV[1]
    redis.call('HSET', KEYS[1], 'e', epoch, 'l', last, 'b', bytes, 'n', count)
    redis.call('PUBLISH', ARGV[6], 'M' .. epoch .. '\n' .. last)
  end
end
"#;

/// `trim(max_bytes, max_count, oldest_allowed)`: the shared trimming rule of
/// `channelbox_core::messages_to_trim`, oldest first: age removes any
/// message (the newest too); bytes and count never remove the newest.
/// Updates the `bytes` and `count` locals (the caller writes them back) and
/// returns how many messages and payload bytes it removed.
const TRIM: &str = r#"
local function trim(max_bytes, max_count, oldest_allowed)
  local removed, removed_bytes = 0, 0
  while count > 0 do
    local entry = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
    if not entry then break end
    local fields = entry[2]
    local z, t = 0, 0
    for i = 1, #fields, 2 do
      if fields[i] == 'z' then z = tonumber(fields[i + 1]) or 0 elseif fields[i] == 't' then t = tonumber(fields[i + 1]) or 0 end
    end
    local too_old = oldest_allowed > 0 and t < oldest_allowed
    local over = bytes > max_bytes or (max_count > 0 and count > max_count)
    if too_old or (count > 1 and over) then
      redis.call('XDEL', KEYS[2], entry[1])
      bytes = bytes - z
      count = count - 1
      removed = removed + 1
      removed_bytes = removed_bytes + z
    else
      break
    end
  end
  return removed, removed_bytes
end
"#;

/// The head after `CHECK`, with messages past their age trimmed: `epoch`,
/// `first` (the oldest retained offset, `last + 1` when none) and `last`.
const HEAD: &str = r#"
local oldest_allowed = tonumber(ARGV[2])
if oldest_allowed > 0 then
  local removed = trim(math.huge, 0, oldest_allowed)
  if removed > 0 then redis.call('HSET', KEYS[1], 'b', bytes, 'n', count) end
end
local first = last + 1
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if oldest then first = tonumber(string.match(oldest[1], '^(%d+)')) end
"#;

/// The line of [`CHECK`] that compares the head with the caller's floor.
const BEHIND: &str = "local behind = ARGV[3] ~= ''";

/// What every group script starts with.
fn prelude() -> String {
    // The head's locals come first: `trim` uses them as upvalues.
    let ensure = ENSURE_EPOCH.replace("READ_EPOCH_TTL", &READ_EPOCH_TTL_SECS.to_string());
    format!("{ensure}{TRIM}{}", check())
}

/// [`CHECK`]; with the injected bug `skip_epoch_change` (a build with
/// `channelbox-core/chaos-mutations`, see `channelbox_core::mutation`) one
/// that never finds the head behind the floor, so that a rollback keeps the
/// epoch and hands its offsets out again — which `cargo xtask chaos` must
/// catch.
fn check() -> String {
    if channelbox_core::mutation::active("skip_epoch_change") {
        return CHECK.replace(BEHIND, "local behind = false and ARGV[3] ~= ''");
    }
    CHECK.to_owned()
}

/// Append. ARGV after the common ones: 7 encoded message, 8 payload size,
/// 9 timestamp, 10 max bytes, 11 max messages (0: none), 12 the channel id
/// that must not receive it ('' for none). Takes the next offset, adds the
/// message, trims (`TRIM`), writes the head back once, refreshes both keys' TTL to the meta TTL and
/// publishes `S<epoch>\n<offset>\n<except>\n<message>`. Returns
/// `{epoch, offset, trimmed messages, trimmed bytes}`.
pub(crate) fn append() -> String {
    format!(
        "{}{}",
        prelude(),
        r#"
local offset = last + 1
local size = tonumber(ARGV[8])
redis.call('XADD', KEYS[2], offset .. '-0', 'b', ARGV[7], 'z', size, 't', ARGV[9])
bytes, count = bytes + size, count + 1
local removed, removed_bytes = trim(tonumber(ARGV[10]), tonumber(ARGV[11]), tonumber(ARGV[2]))
redis.call('HSET', KEYS[1], 'l', offset, 'b', bytes, 'n', count)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('EXPIRE', KEYS[2], ARGV[5])
redis.call('PUBLISH', ARGV[6], 'S' .. epoch .. '\n' .. offset .. '\n' .. ARGV[12] .. '\n' .. ARGV[7])
return {epoch, offset, removed, removed_bytes}
"#
    )
}

/// Head. No arguments of its own. Returns `{epoch, first, last}`.
pub(crate) fn head() -> String {
    format!("{}{HEAD}return {{epoch, first, last}}\n", prelude())
}

/// Read, with the head at the same instant. ARGV after the common ones: 7
/// `last` or `since`, 8 n (last) or the offset to read after (since), 9 the
/// most messages (since). Returns `{epoch, first, last, entries}`, entries
/// newest first for `last` and oldest first for `since`.
pub(crate) fn read() -> String {
    format!(
        "{}{HEAD}{}",
        prelude(),
        r#"
local entries
if ARGV[7] == 'last' then
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[8])
else
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[8] .. '-0', '+', 'COUNT', ARGV[9])
end
return {epoch, first, last, entries}
"#
    )
}

/// Flush: drops the group's messages and starts a new epoch (`ARGV[1]`), kept
/// for the meta TTL (`ARGV[5]`), then publishes `R<epoch>` on the group's
/// channel (`ARGV[6]`). Returns the epoch.
pub(crate) fn flush() -> String {
    r#"
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'l', 0, 'b', 0, 'n', 0)
redis.call('EXPIRE', KEYS[1], ARGV[5])
redis.call('PUBLISH', ARGV[6], 'R' .. ARGV[1])
return ARGV[1]
"#
    .to_owned()
}

/// The scripts in the order their SHA1s are kept.
pub(crate) fn all() -> [String; 4] {
    [append(), head(), read(), flush()]
}

/// [`all`], publishing with `SPUBLISH` when `sharded` (Redis Cluster's
/// sharded pub/sub: the group's channel carries its hash tag, so it is in
/// the slot of the keys the script touches).
pub(crate) fn all_for(sharded: bool) -> [String; 4] {
    let scripts = all();
    if sharded {
        scripts.map(|s| s.replace("redis.call('PUBLISH',", "redis.call('SPUBLISH',"))
    } else {
        scripts
    }
}

/// Indexes into [`all`].
pub(crate) const APPEND: usize = 0;
pub(crate) const HEAD_SCRIPT: usize = 1;
pub(crate) const READ: usize = 2;
pub(crate) const FLUSH: usize = 3;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_injected_bug_finds_the_line_it_replaces() {
        assert!(CHECK.contains(BEHIND), "the skip_epoch_change seam lost its line");
        assert!(prelude().contains(BEHIND));
    }
}
