//! The cluster token: every call to a worker must carry it as `x-cluster-token` metadata.

use tonic::{Request, Status};

pub const TOKEN_HEADER: &str = "x-cluster-token";

/// Compares in time independent of where the strings differ.
fn same(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// A tonic interceptor refusing callers without the cluster token.
#[derive(Clone)]
pub struct CheckToken {
    token: String,
}

impl CheckToken {
    pub fn new(token: String) -> Self {
        CheckToken { token }
    }

    #[allow(clippy::result_large_err)]
    pub fn check(&self, req: Request<()>) -> Result<Request<()>, Status> {
        match req.metadata().get(TOKEN_HEADER) {
            Some(v) if same(v.as_bytes(), self.token.as_bytes()) => Ok(req),
            Some(_) => Err(Status::unauthenticated("wrong cluster token")),
            None => Err(Status::unauthenticated(format!(
                "missing {TOKEN_HEADER} metadata"
            ))),
        }
    }
}

/// A tonic interceptor adding the cluster token to every call (the coordinator's side).
#[derive(Clone)]
pub struct AddToken {
    value: tonic::metadata::MetadataValue<tonic::metadata::Ascii>,
}

impl AddToken {
    pub fn new(token: &str) -> Result<Self, String> {
        let value = token
            .parse()
            .map_err(|_| "the cluster token must be printable ASCII".to_string())?;
        Ok(AddToken { value })
    }

    #[allow(clippy::result_large_err)]
    pub fn add(&self, mut req: Request<()>) -> Result<Request<()>, Status> {
        req.metadata_mut().insert(TOKEN_HEADER, self.value.clone());
        Ok(req)
    }
}

impl tonic::service::Interceptor for AddToken {
    fn call(&mut self, req: Request<()>) -> Result<Request<()>, Status> {
        self.add(req)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_must_match_exactly() {
        let c = CheckToken::new("secret".into());
        let with = |t: Option<&str>| {
            let mut r = Request::new(());
            if let Some(t) = t {
                r.metadata_mut().insert(TOKEN_HEADER, t.parse().unwrap());
            }
            c.check(r).map(|_| ()).map_err(|s| s.code())
        };
        assert_eq!(with(Some("secret")), Ok(()));
        assert_eq!(with(Some("secret2")), Err(tonic::Code::Unauthenticated));
        assert_eq!(with(Some("")), Err(tonic::Code::Unauthenticated));
        assert_eq!(with(None), Err(tonic::Code::Unauthenticated));
    }
}
