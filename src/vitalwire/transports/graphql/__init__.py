"""GraphQL at ``/graphql`` (Strawberry): queries, mutations and subscriptions over
graphql-transport-ws, on the same services as REST and the socket (docs/api.md, "GraphQL")."""

from vitalwire.transports.graphql.router import graphql_ws_endpoint, install

__all__ = ["graphql_ws_endpoint", "install"]
