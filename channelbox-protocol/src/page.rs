//! The browser chat page served at `/`, and the client it runs served at
//! `/channelbox.js`: the `channelbox` package of clients/typescript, bundled
//! and minified by its `npm run build` (`cargo xtask e2e` checks that the
//! embedded copy is that build's output).

/// The page (`GET /`).
pub const CHAT_PAGE: &str = include_str!("../assets/chat.html");

/// The client bundle (`GET /channelbox.js`): a global `channelbox` with
/// `connect(url, options)`.
pub const CLIENT_JS: &str = include_str!("../assets/channelbox.min.js");

/// The path the page loads the client from.
pub const CLIENT_JS_PATH: &str = "/channelbox.js";
