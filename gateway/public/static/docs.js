// Swagger UI on this server's own /openapi.json, with the key from the form on every request.
// The schema itself needs the key, so it is fetched through the same interceptor.

// Paths coglet lists but the gateway does not serve.
const HIDDEN_PATHS = ["/", "/shutdown"];

function loadDocs() {
  const status = document.getElementById("status");
  status.textContent = "";
  SwaggerUIBundle({
    url: "/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    requestInterceptor: (request) => {
      Object.assign(request.headers, authHeaders());
      return request;
    },
    responseInterceptor: (response) => {
      if (response.url.endsWith("/openapi.json")) {
        if (response.status === 401) {
          status.textContent = "The server wants an API key: enter it above.";
        } else if (response.ok && response.body && response.body.paths) {
          HIDDEN_PATHS.forEach((path) => delete response.body.paths[path]);
          response.text = JSON.stringify(response.body);
        }
      }
      return response;
    },
  });
}

bindKeyForm(document.getElementById("key-form"), document.getElementById("key"), loadDocs);
loadDocs();
