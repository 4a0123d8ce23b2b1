//! The OpenAPI document, generated from the handlers' annotations.

use std::sync::Arc;

use axum::{Extension, Json};
use utoipa::openapi::security::{HttpAuthScheme, HttpBuilder, SecurityScheme};
use utoipa::openapi::{OpenApi, OpenApiBuilder};

/// Title, version and the bearer security scheme; paths are added by the router.
pub fn base() -> OpenApi {
    let mut spec = OpenApiBuilder::new()
        .info(
            utoipa::openapi::InfoBuilder::new()
                .title("Kisara API")
                .version(env!("CARGO_PKG_VERSION"))
                .description(Some(
                    "A cluster-level Docker for CTF/AWD ranges. Every route but /healthz \
                     needs `Authorization: Bearer <token>`.",
                ))
                .build(),
        )
        .build();
    let components = spec.components.get_or_insert_with(Default::default);
    components.add_security_scheme(
        "bearer",
        SecurityScheme::Http(HttpBuilder::new().scheme(HttpAuthScheme::Bearer).build()),
    );
    spec.security = Some(vec![utoipa::openapi::security::SecurityRequirement::new(
        "bearer",
        Vec::<String>::new(),
    )]);
    spec
}

pub async fn serve(Extension(spec): Extension<Arc<OpenApi>>) -> Json<OpenApi> {
    Json((*spec).clone())
}
