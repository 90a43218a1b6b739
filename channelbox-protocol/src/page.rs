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

/// The admin page (`GET /admin`): groups, members, messages, publish,
/// close-all, flush and live metrics, over the HTTP API only.
pub const ADMIN_PAGE: &str = include_str!("../assets/admin.html");

/// The path of the admin page.
pub const ADMIN_PATH: &str = "/admin";

/// The admin page, when the server has an admin token; without one the
/// admin API is off and `/admin` answers 404 like any unknown path.
pub fn admin_page(config: &crate::ProtocolConfig) -> Option<&'static str> {
    config.admin_token.as_ref().map(|_| ADMIN_PAGE)
}
