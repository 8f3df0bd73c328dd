// Signing in at the hub's OpenID Connect issuer: the authorization code flow with PKCE for a
// public client (the client id is the hub's --oidc-audience). `start` leaves for the issuer's
// sign-in page; the issuer sends the browser back to /ui/signed-in, whose script trades the
// code for tokens at the issuer's token endpoint and keeps the ID token (its audience is the
// client id, which the hub checks) as the bearer token for this tab.

const FLOW = "shoal.oidc";

function b64url(bytes) {
  return btoa(String.fromCharCode(...new Uint8Array(bytes))).replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "");
}

async function discover(issuer) {
  const r = await fetch(`${issuer.replace(/\/$/, "")}/.well-known/openid-configuration`);
  if (!r.ok) throw new Error(`the issuer's discovery document: ${r.status}`);
  return r.json();
}

/** Leaves for the issuer's sign-in page. */
export async function start() {
  const { oidcIssuer: issuer, oidcClient: client } = document.body.dataset;
  const config = await discover(issuer);
  const verifier = b64url(crypto.getRandomValues(new Uint8Array(32)));
  const state = b64url(crypto.getRandomValues(new Uint8Array(16)));
  const challenge = b64url(await crypto.subtle.digest("SHA-256", new TextEncoder().encode(verifier)));
  sessionStorage.setItem(FLOW, JSON.stringify({ verifier, state, back: location.pathname + location.search }));
  const q = new URLSearchParams({
    response_type: "code",
    client_id: client,
    redirect_uri: `${location.origin}/ui/signed-in`,
    scope: "openid",
    state,
    code_challenge: challenge,
    code_challenge_method: "S256",
  });
  location.assign(`${config.authorization_endpoint}?${q}`);
}

async function finish() {
  const content = document.getElementById("content");
  const say = (text) => {
    content.textContent = text;
    content.setAttribute("aria-busy", "false");
  };
  const q = new URLSearchParams(location.search);
  const flow = JSON.parse(sessionStorage.getItem(FLOW) || "null");
  sessionStorage.removeItem(FLOW);
  if (q.get("error")) return say(`The issuer refused: ${q.get("error_description") || q.get("error")}`);
  if (!flow || !q.get("code") || q.get("state") !== flow.state) return say("This sign-in was not started from this tab, or was already used; start again from any page.");
  const { oidcIssuer: issuer, oidcClient: client } = document.body.dataset;
  const config = await discover(issuer);
  const r = await fetch(config.token_endpoint, {
    method: "POST",
    headers: { "Content-Type": "application/x-www-form-urlencoded" },
    body: new URLSearchParams({
      grant_type: "authorization_code",
      code: q.get("code"),
      redirect_uri: `${location.origin}/ui/signed-in`,
      client_id: client,
      code_verifier: flow.verifier,
    }),
  });
  const tokens = await r.json().catch(() => ({}));
  const token = tokens.id_token || tokens.access_token;
  if (!r.ok || !token) return say(`The issuer gave no token: ${tokens.error_description || tokens.error || r.status}`);
  sessionStorage.setItem("shoal.token", token);
  // Back to a page of this hub only.
  const back = typeof flow.back === "string" && flow.back.startsWith("/") && !flow.back.startsWith("//") ? flow.back : "/";
  location.replace(back);
}

if (location.pathname === "/ui/signed-in") finish().catch((e) => (document.getElementById("content").textContent = e.message));
