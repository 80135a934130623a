//! The `ingress` role (issue 19), being built in steps. So far: the
//! routing table ([`routes`]) that turns the Ingresses of this node's
//! class into a choice of Service port per request. Not yet: the role
//! itself (watching Ingresses, Services, EndpointSlices and Secrets, and
//! serving HTTP and HTTPS with hyper and rustls).

pub mod routes;
