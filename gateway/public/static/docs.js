// Swagger UI on this server's own /openapi.json, with the key from the form on every request.
// The schema itself needs the key, so it is fetched through the same interceptor.

// Paths coglet lists but the gateway does not serve.
const HIDDEN_PATHS = ["/", "/shutdown"];
// What the gateway adds to coglet's API (README: "Following an async prediction").
const GET_PREDICTION = {
  summary: "Get an async prediction (gateway)",
  description: "The latest state of a prediction started here with `Prefer: respond-async` and no webhook, " +
    "for an hour; only to the key that started it. Its logs carry the denoising steps.",
  parameters: [{ name: "prediction_id", in: "path", required: true, schema: { type: "string" } }],
  responses: {
    200: { description: "The prediction", content: { "application/json": { schema: { $ref: "#/components/schemas/PredictionResponse" } } } },
    404: { description: "Not started here with this key, or forgotten" },
  },
};

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
          // Cog's own schema (what `cog build` writes) has no /predictions/{prediction_id}: add the
          // gateway's GET there, beside whatever the server lists.
          const paths = response.body.paths;
          paths["/predictions/{prediction_id}"] = { ...(paths["/predictions/{prediction_id}"] || {}), get: GET_PREDICTION };
          response.text = JSON.stringify(response.body);
        }
      }
      return response;
    },
  });
}

bindKeyForm(document.getElementById("key-form"), document.getElementById("key"), loadDocs);
loadDocs();
