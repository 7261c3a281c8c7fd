//! The relay as one OpenID Connect client of the site's identity provider: discovery,
//! the authorization-code flow with PKCE, state and nonce, and ID-token verification
//! (issuer, audience, expiry, nonce, signature from the IdP's key set, fetched again
//! once when a token names a key the relay does not know), all by the `openidconnect`
//! crate.

use super::idp_http::{IdpHttp, IdpHttpError};
use openidconnect::core::{
    CoreAuthDisplay, CoreAuthPrompt, CoreAuthenticationFlow, CoreErrorResponseType,
    CoreGenderClaim, CoreJsonWebKey, CoreJsonWebKeySet, CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm, CoreProviderMetadata, CoreRevocableToken, CoreRevocationErrorResponse,
    CoreTokenIntrospectionResponse, CoreTokenType,
};
use openidconnect::{
    AdditionalClaims, AuthorizationCode, Client, ClientId, ClientSecret, CsrfToken,
    EmptyExtraTokenFields, EndpointMaybeSet, EndpointNotSet, EndpointSet, IdTokenFields,
    IdTokenVerifier, IssuerUrl, Nonce, PkceCodeChallenge, PkceCodeVerifier, RedirectUrl, Scope,
    StandardErrorResponse, StandardTokenResponse,
};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use thiserror::Error;

/// Every claim of the ID token beyond the standard ones, so that the configured user-name
/// and groups claims can be read whatever they are called.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct ExtraClaims(HashMap<String, serde_json::Value>);

impl AdditionalClaims for ExtraClaims {}

type Fields = IdTokenFields<
    ExtraClaims,
    EmptyExtraTokenFields,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;
type TokenResponse = StandardTokenResponse<Fields, CoreTokenType>;
type OidcClient = Client<
    ExtraClaims,
    CoreAuthDisplay,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJsonWebKey,
    CoreAuthPrompt,
    StandardErrorResponse<CoreErrorResponseType>,
    TokenResponse,
    CoreTokenIntrospectionResponse,
    CoreRevocableToken,
    CoreRevocationErrorResponse,
    EndpointSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointNotSet,
    EndpointMaybeSet,
    EndpointMaybeSet,
>;
type IdTokenClaims = openidconnect::IdTokenClaims<ExtraClaims, CoreGenderClaim>;
type IdToken = openidconnect::IdToken<
    ExtraClaims,
    CoreGenderClaim,
    CoreJweContentEncryptionAlgorithm,
    CoreJwsSigningAlgorithm,
>;

/// Why an ID token was not accepted.
#[derive(Debug, Error)]
enum Unchecked {
    /// Signed by a key the relay's copy of the key set lacks.
    #[error("ID token signed by an unknown key")]
    UnknownKey,
    /// Anything else.
    #[error("{0}")]
    Invalid(String),
}

/// Why a step with the identity provider failed.
#[derive(Debug, Error)]
pub enum IdpError {
    /// The IdP could not be reached or answered nonsense (the user sees a 503).
    #[error("the identity provider is unavailable: {0}")]
    Unavailable(String),
    /// The IdP answered, but the login is not valid (the user sees a 403).
    #[error("{0}")]
    Rejected(String),
}

/// Who a verified ID token says the user is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SignedIn {
    /// The user name (the configured claim).
    pub user: String,
    /// The user's groups (the configured claim; empty if absent).
    pub groups: Vec<String>,
}

/// What the relay knows of its IdP once discovered.
struct Provider {
    metadata: CoreProviderMetadata,
    jwks: CoreJsonWebKeySet,
}

/// A login the browser is sent off to do: what to keep until its callback.
pub struct Started {
    /// The IdP URL to send the browser to.
    pub url: String,
    /// The `state` parameter (a secret: it names the pending login).
    pub state: String,
    /// The PKCE verifier.
    pub verifier: PkceCodeVerifier,
    /// The nonce the ID token must carry.
    pub nonce: Nonce,
}

/// The relay's OIDC client.
pub struct Idp {
    issuer: IssuerUrl,
    client_id: ClientId,
    secret: ClientSecret,
    redirect: RedirectUrl,
    username_claim: String,
    groups_claim: String,
    http: IdpHttp,
    provider: RwLock<Option<Arc<Provider>>>,
}

/// Settings of [`Idp::new`].
pub struct IdpSettings {
    /// The issuer URL.
    pub issuer: String,
    /// The client id.
    pub client_id: String,
    /// The client secret.
    pub secret: String,
    /// `https://login.<domain>/callback`.
    pub redirect: String,
    /// The user-name claim.
    pub username_claim: String,
    /// The groups claim.
    pub groups_claim: String,
}

impl Idp {
    /// A client that discovers the IdP on first use (the relay starts while it is down).
    pub fn new(settings: IdpSettings, http: IdpHttp) -> Result<Self, String> {
        Ok(Self {
            issuer: IssuerUrl::new(settings.issuer.clone())
                .map_err(|e| format!("oidc_issuer {:?}: {e}", settings.issuer))?,
            client_id: ClientId::new(settings.client_id),
            secret: ClientSecret::new(settings.secret),
            redirect: RedirectUrl::new(settings.redirect.clone())
                .map_err(|e| format!("redirect URI {:?}: {e}", settings.redirect))?,
            username_claim: settings.username_claim,
            groups_claim: settings.groups_claim,
            http,
            provider: RwLock::new(None),
        })
    }

    /// The issuer URL, for pages ("the identity provider at ... is unavailable").
    pub fn issuer(&self) -> &str {
        self.issuer.as_str()
    }

    fn caller(&self) -> impl Fn(openidconnect::HttpRequest) -> HttpFuture {
        let http = self.http.clone();
        move |request| {
            let http = http.clone();
            Box::pin(async move { http.send(request).await })
        }
    }

    /// Discovers the IdP again (metadata and keys): each new login does, so a login
    /// starts only while the IdP answers, and key rotations are picked up.
    async fn discover(&self) -> Result<Arc<Provider>, IdpError> {
        let caller = self.caller();
        let metadata = CoreProviderMetadata::discover_async(self.issuer.clone(), &caller)
            .await
            .map_err(|e| IdpError::Unavailable(error_chain(&e)))?;
        let jwks = metadata.jwks().clone();
        let provider = Arc::new(Provider { metadata, jwks });
        *self.provider.write().unwrap_or_else(|e| e.into_inner()) = Some(provider.clone());
        Ok(provider)
    }

    async fn provider(&self) -> Result<Arc<Provider>, IdpError> {
        let known = self
            .provider
            .read()
            .unwrap_or_else(|e| e.into_inner())
            .clone();
        match known {
            Some(provider) => Ok(provider),
            None => self.discover().await,
        }
    }

    fn client(&self, provider: &Provider) -> OidcClient {
        OidcClient::from_provider_metadata(
            provider.metadata.clone(),
            self.client_id.clone(),
            Some(self.secret.clone()),
        )
        .set_redirect_uri(self.redirect.clone())
    }

    /// Starts a login: the IdP URL with a fresh state, nonce and PKCE challenge (S256);
    /// `ask_again`: the IdP must ask for credentials even if it has a session
    /// (`prompt=login`), to switch accounts.
    pub async fn start(&self, ask_again: bool) -> Result<Started, IdpError> {
        let provider = self.discover().await?;
        let client = self.client(&provider);
        let (challenge, verifier) = PkceCodeChallenge::new_random_sha256();
        let mut request = client
            .authorize_url(
                CoreAuthenticationFlow::AuthorizationCode,
                CsrfToken::new_random,
                Nonce::new_random,
            )
            .add_scope(Scope::new("profile".into()))
            .add_scope(Scope::new("email".into()))
            .set_pkce_challenge(challenge);
        if ask_again {
            request = request.add_prompt(CoreAuthPrompt::Login);
        }
        let (url, state, nonce) = request.url();
        Ok(Started {
            url: url.to_string(),
            state: state.secret().clone(),
            verifier,
            nonce,
        })
    }

    /// Redeems `code` and verifies the ID token it brings against `nonce`.
    pub async fn finish(
        &self,
        code: String,
        verifier: PkceCodeVerifier,
        nonce: &Nonce,
    ) -> Result<SignedIn, IdpError> {
        let provider = self.provider().await?;
        let client = self.client(&provider);
        let caller = self.caller();
        let response = client
            .exchange_code(AuthorizationCode::new(code))
            .map_err(|e| IdpError::Unavailable(format!("no token endpoint: {e}")))?
            .set_pkce_verifier(verifier)
            .request_async(&caller)
            .await
            .map_err(|e| match e {
                openidconnect::RequestTokenError::ServerResponse(r) => IdpError::Rejected(format!(
                    "the identity provider refused the code: {}",
                    r.error()
                )),
                other => IdpError::Unavailable(error_chain(&other)),
            })?;
        let id_token = response
            .extra_fields()
            .id_token()
            .ok_or_else(|| IdpError::Rejected("the identity provider sent no ID token".into()))?;
        match self.check(id_token, &provider.jwks, nonce) {
            Err(Unchecked::UnknownKey) => {
                // A key the relay has not seen: the IdP may have rotated its keys.
                let fresh = self.discover().await?;
                self.check(id_token, &fresh.jwks, nonce)
                    .map_err(|e| IdpError::Rejected(e.to_string()))
            }
            other => other.map_err(|e| IdpError::Rejected(e.to_string())),
        }
    }

    /// Verifies `id_token` (signature by a key of `jwks`, issuer, audience, expiry,
    /// nonce) and reads the user from it.
    fn check(
        &self,
        id_token: &IdToken,
        jwks: &CoreJsonWebKeySet,
        nonce: &Nonce,
    ) -> Result<SignedIn, Unchecked> {
        match id_token.claims(&self.verifier(jwks), nonce) {
            Ok(claims) => self
                .identity(claims)
                .map_err(|e| Unchecked::Invalid(e.to_string())),
            Err(openidconnect::ClaimsVerificationError::SignatureVerification(
                openidconnect::SignatureVerificationError::NoMatchingKey,
            )) => Err(Unchecked::UnknownKey),
            Err(e) => Err(Unchecked::Invalid(format!("ID token not valid: {e}"))),
        }
    }

    fn verifier<'a>(&self, jwks: &CoreJsonWebKeySet) -> IdTokenVerifier<'a, CoreJsonWebKey> {
        IdTokenVerifier::new_confidential_client(
            self.client_id.clone(),
            self.secret.clone(),
            self.issuer.clone(),
            jwks.clone(),
        )
    }

    fn identity(&self, claims: &IdTokenClaims) -> Result<SignedIn, IdpError> {
        let user = claim_text(claims, &self.username_claim).ok_or_else(|| {
            IdpError::Rejected(format!(
                "the ID token has no {:?} claim (see oidc_username_claim)",
                self.username_claim
            ))
        })?;
        if !super::valid_name(&user) {
            return Err(IdpError::Rejected(format!(
                "the user name in claim {:?} is not a valid jobgate user name",
                self.username_claim
            )));
        }
        let groups = match claims.additional_claims().0.get(&self.groups_claim) {
            Some(serde_json::Value::Array(items)) => items
                .iter()
                .filter_map(|g| g.as_str())
                .map(str::to_owned)
                .take(super::MAX_GROUPS)
                .collect(),
            Some(serde_json::Value::String(one)) => vec![one.clone()],
            _ => Vec::new(),
        };
        Ok(SignedIn { user, groups })
    }
}

type HttpFuture = std::pin::Pin<
    Box<dyn std::future::Future<Output = Result<openidconnect::HttpResponse, IdpHttpError>> + Send>,
>;

/// The claim `name` as text: standard claims by their accessors, others from the rest.
fn claim_text(claims: &IdTokenClaims, name: &str) -> Option<String> {
    let standard = match name {
        "sub" => Some(claims.subject().as_str().to_owned()),
        "preferred_username" => claims.preferred_username().map(|u| u.as_str().to_owned()),
        "email" => claims.email().map(|e| e.as_str().to_owned()),
        _ => None,
    };
    standard.or_else(|| match claims.additional_claims().0.get(name) {
        Some(serde_json::Value::String(text)) => Some(text.clone()),
        _ => None,
    })
}

/// An error with its causes, for the operator's log (never holds a secret: the crate's
/// errors name URLs and statuses).
fn error_chain(error: &dyn std::error::Error) -> String {
    let mut text = error.to_string();
    let mut source = error.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;
    use openidconnect::core::CoreRsaPrivateSigningKey;
    use openidconnect::{
        Audience, EndUserUsername, JsonWebKeyId, PrivateSigningKey, StandardClaims,
        SubjectIdentifier,
    };

    /// A 2048-bit RSA key made for these tests only.
    const KEY: &str = include_str!("testdata/test-only-rsa-key.pem");
    const ISSUER: &str = "https://idp.example.org/realms/hpc";

    fn idp() -> Idp {
        Idp::new(
            IdpSettings {
                issuer: ISSUER.into(),
                client_id: "jobgate".into(),
                secret: "s".into(),
                redirect: "https://login.jobgate.test/callback".into(),
                username_claim: "preferred_username".into(),
                groups_claim: "groups".into(),
            },
            IdpHttp::new(None).expect("client"),
        )
        .expect("idp")
    }

    fn key(kid: &str) -> CoreRsaPrivateSigningKey {
        CoreRsaPrivateSigningKey::from_pem(KEY, Some(JsonWebKeyId::new(kid.into()))).expect("key")
    }

    /// A token as the IdP would sign it, changed by `edit`.
    fn token(
        kid: &str,
        edit: impl FnOnce(&mut (String, String, i64, Option<String>, Option<&str>)),
    ) -> IdToken {
        // (issuer, audience, seconds until expiry, nonce, user)
        let mut fields = (
            ISSUER.to_owned(),
            "jobgate".to_owned(),
            300,
            Some("n".to_owned()),
            Some("alice"),
        );
        edit(&mut fields);
        let (issuer, audience, expires_in, nonce, user) = fields;
        let now = chrono::Utc::now();
        let mut standard = StandardClaims::new(SubjectIdentifier::new("sub-1".into()));
        if let Some(user) = user {
            standard = standard.set_preferred_username(Some(EndUserUsername::new(user.into())));
        }
        let mut extra = HashMap::new();
        extra.insert(
            "groups".to_owned(),
            serde_json::json!(["physics", 7, "astro"]),
        );
        let claims = IdTokenClaims::new(
            IssuerUrl::new(issuer).expect("issuer"),
            vec![Audience::new(audience)],
            now + chrono::Duration::seconds(expires_in),
            now - chrono::Duration::seconds(10),
            standard,
            ExtraClaims(extra),
        )
        .set_nonce(nonce.map(Nonce::new));
        IdToken::new(
            claims,
            &key(kid),
            CoreJwsSigningAlgorithm::RsaSsaPkcs1V15Sha256,
            None,
            None,
        )
        .expect("signed")
    }

    fn jwks() -> CoreJsonWebKeySet {
        CoreJsonWebKeySet::new(vec![key("k1").as_verification_key()])
    }

    #[test]
    fn a_good_token_names_the_user_and_groups() {
        let who = idp()
            .check(&token("k1", |_| {}), &jwks(), &Nonce::new("n".into()))
            .expect("valid");
        assert_eq!(who.user, "alice");
        assert_eq!(who.groups, vec!["physics".to_owned(), "astro".to_owned()]);
    }

    #[test]
    fn wrong_issuer_audience_expiry_nonce_or_key_are_refused() {
        let nonce = Nonce::new("n".into());
        let check = |t: IdToken| idp().check(&t, &jwks(), &nonce);
        assert!(matches!(
            check(token("k1", |f| f.0 = "https://evil.example".into())),
            Err(Unchecked::Invalid(_))
        ));
        assert!(matches!(
            check(token("k1", |f| f.1 = "another-client".into())),
            Err(Unchecked::Invalid(_))
        ));
        assert!(matches!(
            check(token("k1", |f| f.2 = -120)),
            Err(Unchecked::Invalid(_))
        ));
        assert!(matches!(
            check(token("k1", |f| f.3 = Some("other".into()))),
            Err(Unchecked::Invalid(_))
        ));
        assert!(matches!(
            check(token("k1", |f| f.3 = None)),
            Err(Unchecked::Invalid(_))
        ));
        assert!(matches!(
            check(token("k2", |_| {})),
            Err(Unchecked::UnknownKey)
        ));
        let nameless = check(token("k1", |f| f.4 = None));
        assert!(
            matches!(&nameless, Err(Unchecked::Invalid(e)) if e.contains("preferred_username")),
            "{nameless:?}"
        );
        let bad_name = check(token("k1", |f| f.4 = Some("alice smith")));
        assert!(matches!(bad_name, Err(Unchecked::Invalid(_))));
    }
}
