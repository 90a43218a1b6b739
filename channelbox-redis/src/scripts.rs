//! The Lua scripts: every change to a group's history is one script, so that
//! Redis executes it atomically. Each touches only the group's own keys
//! (`KEYS[1]` its head hash, `KEYS[2]` its stream), which share a hash tag, so
//! the layout works on Redis Cluster too.
//!
//! The head hash holds `e` (the epoch), `l` (the newest offset of the epoch),
//! `b` (payload bytes retained) and `n` (messages retained). Stream entry
//! `<offset>-0` holds `b` (the encoded message), `z` (its payload size) and
//! `t` (its timestamp, ms).

/// Creates the group's epoch when missing (from `ARGV[1]`, a fresh candidate):
/// shared by every script, so a group gets its epoch the first time any
/// server reads or writes it. A stream left without its head (an eviction)
/// goes too: its offsets belong to a lost epoch.
const ENSURE_EPOCH: &str = r#"
local epoch = redis.call('HGET', KEYS[1], 'e')
if not epoch then
  epoch = ARGV[1]
  redis.call('HSET', KEYS[1], 'e', epoch, 'l', 0, 'b', 0, 'n', 0)
  redis.call('DEL', KEYS[2])
end
"#;

/// `trim(max_bytes, max_count, oldest_allowed)`: the shared trimming rule of
/// `channelbox_core::messages_to_trim`, oldest first: age removes any
/// message (the newest too); bytes and count never remove the newest.
const TRIM: &str = r#"
local function trim(max_bytes, max_count, oldest_allowed)
  local bytes = tonumber(redis.call('HGET', KEYS[1], 'b'))
  local count = tonumber(redis.call('HGET', KEYS[1], 'n'))
  while count > 0 do
    local entry = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
    if not entry then break end
    local fields = entry[2]
    local z, t = 0, 0
    for i = 1, #fields, 2 do
      if fields[i] == 'z' then z = tonumber(fields[i + 1]) elseif fields[i] == 't' then t = tonumber(fields[i + 1]) end
    end
    local too_old = oldest_allowed > 0 and t < oldest_allowed
    local over = bytes > max_bytes or (max_count > 0 and count > max_count)
    if too_old or (count > 1 and over) then
      redis.call('XDEL', KEYS[2], entry[1])
      bytes = bytes - z
      count = count - 1
    else
      break
    end
  end
  redis.call('HSET', KEYS[1], 'b', bytes, 'n', count)
end
"#;

/// The head after `ENSURE_EPOCH`, with messages past their age trimmed
/// (`ARGV[2]`, the oldest timestamp allowed, 0 for none): `epoch`, `first`
/// (the oldest retained offset, `last + 1` when none) and `last`.
const HEAD: &str = r#"
local oldest_allowed = tonumber(ARGV[2])
if oldest_allowed > 0 then trim(math.huge, 0, oldest_allowed) end
local last = tonumber(redis.call('HGET', KEYS[1], 'l'))
local first = last + 1
local oldest = redis.call('XRANGE', KEYS[2], '-', '+', 'COUNT', 1)[1]
if oldest then first = tonumber(string.match(oldest[1], '^(%d+)')) end
"#;

/// Append. ARGV: 1 candidate epoch, 2 oldest allowed timestamp (0: none),
/// 3 encoded message, 4 payload size, 5 timestamp, 6 max bytes, 7 max
/// messages (0: none), 8 the group's pub/sub channel, 9 the channel id that
/// must not receive it ('' for none). Takes the next offset, adds the
/// message, trims (`TRIM`) and publishes
/// `S<epoch>\n<offset>\n<except>\n<message>`. Returns `{epoch, offset}`.
pub(crate) fn append() -> String {
    format!(
        "{TRIM}{ENSURE_EPOCH}{}",
        r#"
local offset = redis.call('HINCRBY', KEYS[1], 'l', 1)
local size = tonumber(ARGV[4])
redis.call('XADD', KEYS[2], offset .. '-0', 'b', ARGV[3], 'z', size, 't', ARGV[5])
redis.call('HINCRBY', KEYS[1], 'b', size)
redis.call('HINCRBY', KEYS[1], 'n', 1)
trim(tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[2]))
redis.call('PUBLISH', ARGV[8], 'S' .. epoch .. '\n' .. offset .. '\n' .. ARGV[9] .. '\n' .. ARGV[3])
return {epoch, offset}
"#
    )
}

/// Head. ARGV: 1 candidate epoch, 2 oldest allowed timestamp. Returns
/// `{epoch, first, last}`.
pub(crate) fn head() -> String {
    format!("{TRIM}{ENSURE_EPOCH}{HEAD}return {{epoch, first, last}}\n")
}

/// Read, with the head at the same instant. ARGV: 1 candidate epoch, 2
/// oldest allowed timestamp, 3 `last` or `since`, 4 n (last) or the offset to
/// read after (since), 5 the most messages (since). Returns
/// `{epoch, first, last, entries}`, entries newest first for `last` and
/// oldest first for `since`.
pub(crate) fn read() -> String {
    format!(
        "{TRIM}{ENSURE_EPOCH}{HEAD}{}",
        r#"
local entries
if ARGV[3] == 'last' then
  entries = redis.call('XREVRANGE', KEYS[2], '+', '-', 'COUNT', ARGV[4])
else
  entries = redis.call('XRANGE', KEYS[2], '(' .. ARGV[4] .. '-0', '+', 'COUNT', ARGV[5])
end
return {epoch, first, last, entries}
"#
    )
}

/// Flush: drops the group's messages and starts a new epoch (`ARGV[1]`), then
/// publishes `R<epoch>` on the group's channel (`ARGV[2]`). Returns the epoch.
pub(crate) fn flush() -> String {
    r#"
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[1], 'e', ARGV[1], 'l', 0, 'b', 0, 'n', 0)
redis.call('PUBLISH', ARGV[2], 'R' .. ARGV[1])
return ARGV[1]
"#
    .to_owned()
}

/// The scripts in the order their SHA1s are kept.
pub(crate) fn all() -> [String; 4] {
    [append(), head(), read(), flush()]
}

/// Indexes into [`all`].
pub(crate) const APPEND: usize = 0;
pub(crate) const HEAD_SCRIPT: usize = 1;
pub(crate) const READ: usize = 2;
pub(crate) const FLUSH: usize = 3;
